"""The `gemmascope` command line: thin entry points over the pipeline's stages.

Every command exits 2 with one line on bad input (a `UserError`) or when the machine
refuses a write (a full disk, a file-size limit), and keeps tracebacks for real bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from gemmascope.errors import UserError, environment_failure
from gemmascope.huge_pages import reexec_with_huge_pages

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class OneLineParser(argparse.ArgumentParser):
    """argparse reporting a bad command line in one line (usage stays behind --help).

    Long options must be spelled out: argparse's default takes any unambiguous prefix,
    so a mistyped `--c` in a cron line would silently mean `--coordinator`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        fail(f"{message} (see `{self.prog} --help`)")


def fail(message: str, status: int = 2) -> None:
    """Print `message` as the one line `gemmascope: error: ...` and exit with `status`."""
    print(f"gemmascope: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def one_line(message: str) -> str:
    """Newlines inside a message (a path or key that contains one) would split the error."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class MachineFailureEchoes(logging.Filter):
    """Keeps the echoes of a refused write to one line each, so they do not bury the error line.

    When a checkpoint meets a full disk, Orbax logs the writer thread's traceback and
    TensorStore's pending writes then call back into a closed event loop (exceptions Python
    ignores and prints) before the save fails in the main thread, whose error line reports
    it. Records and ignored exceptions not caused by such a failure keep Python's report.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.previous_hook = sys.unraisablehook

    @contextlib.contextmanager
    def installed(self):
        """On the root logger's handlers and as sys.unraisablehook while a command runs."""
        handlers = self._install()
        try:
            yield
        finally:
            sys.unraisablehook = self.previous_hook
            for handler in handlers:
                handler.removeFilter(self)

    def stay_until_exit(self) -> None:
        """After the command failed on a refused write: keep echoes to one line until the
        process ends (asyncio reports unretrieved write tasks when they are collected,
        which may be after the command returned)."""
        self.failed = True
        self._install()

    def _install(self) -> list[logging.Handler]:
        """On the root logger's handlers (returned) and as sys.unraisablehook."""
        handlers = list(logging.getLogger().handlers)
        self.previous_hook = sys.unraisablehook
        for handler in handlers:
            handler.addFilter(self)
        sys.unraisablehook = self.unraisable
        return handlers

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        message = environment_failure(failure) if failure is not None else None
        if message is not None:
            self.failed = True
            record.msg, record.args = f"a background write failed: {one_line(message)}", ()
            record.exc_info, record.exc_text = None, None
        elif failure is not None and (self.failed or _closed_loop(failure)):
            record.msg, record.args = _echo(failure), ()
            record.exc_info, record.exc_text = None, None
        return True

    def unraisable(self, info) -> None:
        """sys.unraisablehook. A pending write calling back into the event loop the failure
        closed is an echo even when it comes before the failure's own record (the two
        happen on different threads)."""
        if not (self.failed or _closed_loop(info.exc_value)):
            self.previous_hook(info)
            return
        logging.getLogger("gemmascope").warning("%s", _echo(info.exc_value))


def _echo(error: BaseException) -> str:
    """One line for an exception that follows a refused write."""
    return f"after the failed write: {type(error).__name__}: {one_line(str(error))}"


def _closed_loop(error: BaseException | None) -> bool:
    """asyncio's refusal to schedule onto a closed event loop."""
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _ray_address(args: argparse.Namespace) -> str | None:
    """--ray-address, checked before the command writes anything (Ray's own retries take minutes)."""
    from gemmascope.cluster import check_reachable

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    return args.ray_address


def _harvest(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.harvest.driver import run_harvest

    config = load_config(args.config, args.overrides)
    summary = run_harvest(config, ray_address=_ray_address(args), progress=not args.no_progress)
    print(summary.line())


DISTRIBUTED_FLAGS = {"coordinator": "--coordinator", "processes": "--processes", "process_id": "--process-id"}


def _distributed(args: argparse.Namespace):
    """The multi-host job this process joins: all three flags, or none for a one-process job."""
    from gemmascope.train.distributed import Distributed

    given = [name for name in DISTRIBUTED_FLAGS if getattr(args, name) is not None]
    if not given:
        return None
    if len(given) < len(DISTRIBUTED_FLAGS):
        missing = [flag for name, flag in DISTRIBUTED_FLAGS.items() if name not in given]
        raise UserError(f"{', '.join(DISTRIBUTED_FLAGS.values())} go together: "
                        f"{' and '.join(DISTRIBUTED_FLAGS[name] for name in given)} given without "
                        f"{' and '.join(missing)}")
    return Distributed(args.coordinator, args.processes, args.process_id)


def _train(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.train.trainer import train_job

    dist = _distributed(args)
    config = load_config(args.config, args.overrides)
    result = train_job(config, args.job, progress=not args.no_progress, dist=dist)
    print(f"trained {result.job}: {result.steps} steps ({result.steps_run} now, "
          f"{result.tokens_per_s:,.0f} tokens/s); SAEs in {result.directory}/saes")


def _plan(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.sweep.plan import format_plan, model_shape, plan

    config = load_config(args.config, args.overrides)
    result = plan(config, model_shape(config))
    print(json.dumps(result) if args.json else format_plan(result))


def _sweep(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.sweep.launcher import run_sweep

    config = load_config(args.config, args.overrides)
    summary = run_sweep(config, ray_address=_ray_address(args), progress=not args.no_progress,
                        retry_failed=args.retry_failed)
    if summary.harvest:
        print(summary.harvest)
    print(summary.line())
    if summary.failed:
        raise UserError(f"{len(summary.failed)} job(s) failed; `gemmascope status {args.config}` shows why; "
                        "fix the cause and rerun with --retry-failed")


def _status(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.sweep.status import format_status, status

    result = status(load_config(args.config, args.overrides))
    print(json.dumps(result) if args.json else format_status(result))


def _eval(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.eval.evaluate import run_eval

    print(run_eval(load_config(args.config, args.overrides), progress=not args.no_progress))


def _export(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.export.release import run_export

    print(run_export(load_config(args.config, args.overrides)))


def _import(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.export.importers import run_import

    print(run_import(load_config(args.config, args.overrides), args.source, site=args.site, layer=args.layer,
                     name=args.name, target=args.target))


def _verify(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.store import ActivationStore

    config = load_config(args.config, args.overrides)
    store = ActivationStore.open(config.run_dir)
    checked = store.verify(progress=not args.no_progress)
    print(f"{store.url}: {checked} (unit, array) checksums match the ledger")


def _report(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.report.pages import run_report

    print(run_report(load_config(args.config, args.overrides), progress=not args.no_progress))


def _demo(args: argparse.Namespace) -> None:
    from gemmascope.config import load_config
    from gemmascope.pipeline import run_pipeline

    path = REPO_CONFIGS / "demo.yaml"
    config = load_config(path, [f"run_dir={args.out}"])
    logging.getLogger("gemmascope").info("demo: %s -> %s (harvest, sweep, eval, export, report)", path, args.out)
    for line in run_pipeline(config, ray_address=_ray_address(args), progress=not args.no_progress):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gemmascope", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def config_command(name: str, help_text: str, run) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="config overrides, e.g. harvest.layers=[3,6]")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
        command.set_defaults(run=run)
        return command

    harvest = config_command("harvest", "harvest activations into RUN/activations (resumable)", _harvest)
    harvest.add_argument("--ray-address", default=None,
                         help="attach to this Ray cluster ('auto' for the local one); default: start one")
    train = config_command("train", "train one job's SAEs in this process (resumable)", _train)
    train.add_argument("--job", required=True, help="job id as `gemmascope plan` lists it, e.g. res-L6-w2k")
    train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="multi-host job: process 0's coordinator address (with --processes, --process-id)")
    train.add_argument("--processes", type=int, default=None, metavar="N",
                       help="multi-host job: how many processes run this same command")
    train.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="multi-host job: this process's index, 0..N-1 (0 writes the job's files)")
    plan = config_command("plan", "the SAE grid, its jobs and resources, storage and compute", _plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    sweep = config_command("sweep", "run (or resume) every unfinished job on Ray", _sweep)
    sweep.add_argument("--ray-address", default=None,
                       help="attach to this Ray cluster ('auto' for the local one); default: start one")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="give failed jobs a fresh set of attempts")
    config_command("eval", "L0, FVU, densities and delta LM loss of every trained SAE on held-out data", _eval)
    config_command("export", "evaluated SAEs in the Gemma Scope layout and SAELens's format", _export)
    imports = config_command("import", "bring a released SAE or transcoder (Gemma Scope or SAELens) into the run",
                             _import)
    imports.add_argument("--source", required=True,
                         help="folder (local or gs://) holding params.npz, or sae_weights.safetensors + cfg.json")
    imports.add_argument("--site", default=None, help="site it reads, when its path does not say (res, mlp, att)")
    imports.add_argument("--layer", type=int, default=None, help="layer it reads, when its path does not say")
    imports.add_argument("--target", default=None,
                         help="a Gemma Scope transcoder's output site (mlp), when its path does not say")
    imports.add_argument("--name", default=None, help="name under RUN/imported (default: stream + content hash)")
    config_command("verify", "re-read the activation store and check every unit against its ledger checksum",
                   _verify)
    config_command("report", "the static HTML report: frontiers, densities, feature pages", _report)
    status = config_command("status", "each job's state, attempts, last metrics and checkpoint", _status)
    status.add_argument("--json", action="store_true", help="print one JSON object")

    demo = commands.add_parser("demo", help="the pipeline on Gemma 3 270M and the offline demo corpus")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="throughput benchmarks that print JSON")
    bench_commands = bench.add_subparsers(dest="benchmark", required=True)
    from gemmascope.bench import add_benchmarks

    add_benchmarks(bench_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own, not a caller's function call
        reexec_with_huge_pages()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    # JAX reports at INFO each accelerator plugin it looked for and did not find.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`sweep C --ray-address A run_dir=X`).
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    echoes = MachineFailureEchoes()
    try:
        with echoes.installed():
            args.run(args)
    except UserError as err:
        print(f"gemmascope: error: {one_line(str(err))}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Exception as err:  # a full disk is not a bug: one line, like bad input
        message = environment_failure(err)
        if message is None:
            raise
        if argv is None:  # the process ends with this command
            echoes.stay_until_exit()
        print(f"gemmascope: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemmascope: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
