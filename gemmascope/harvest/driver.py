"""The harvest driver: plan the rows, hand work to Ray actors, commit results to the ledger.

Phase 1 tokenises source shards (in order, in parallel waves, only as many as the token
budget needs) and fixes the row layout. Phase 2 runs the work units. After each
finished shard or unit the ledger is rewritten atomically, so killing the driver (or any
worker) at any moment loses at most the work in flight, and rerunning the same command
continues from the ledger.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from gemmascope import storage
from gemmascope.cluster import connect
from gemmascope.config import Config, harvest_keys
from gemmascope.errors import ConfigError, UserError
from gemmascope.harvest.actors import HarvestActor, actor_options
from gemmascope.harvest.sources import SourceShard, list_shards
from gemmascope.models.checkpoint_check import check_checkpoint
from gemmascope.models.loading import ModelInfo, model_info
from gemmascope.store import paths
from gemmascope.store.arrays import create_array
from gemmascope.store.layout import Layout
from gemmascope.store.ledger import HarvestLedger

log = logging.getLogger("gemmascope.harvest")


@dataclass(frozen=True)
class HarvestSummary:
    activations: str
    rows: int  # rows per array
    arrays: int
    bytes: int
    seconds: float
    units_run: int
    tokens_per_s: float  # rows harvested by this invocation per second of phase 2
    # Activation bytes (every array, as stored) written by this invocation per second of
    # phase 2, in MiB/s: what the workers together asked of the store's bandwidth.
    write_mib_s: float = 0.0

    def line(self) -> str:
        return (f"harvest complete: {self.rows:,} rows x {self.arrays} arrays, "
                f"{self.bytes / 2**30:.2f} GiB in {self.activations} "
                f"({self.units_run} units run now, {self.tokens_per_s:,.0f} tokens/s, "
                f"{self.write_mib_s:,.1f} MiB/s written, {self.seconds:.1f} s)")


def check_layers(config: Config, info: ModelInfo) -> None:
    """The model-dependent config checks: every layer must exist."""
    if config.harvest.layers == "all":
        return
    for i, layer in enumerate(config.harvest.layers):
        if layer >= info.n_layers:
            raise ConfigError(
                f"{config.origin}: harvest.layers[{i}]={layer}: layer out of range "
                f"({info.name} has {info.n_layers} layers, 0..{info.n_layers - 1})"
            )


def array_specs(config: Config, info: ModelInfo) -> list[dict]:
    """(site, layer, d_in) of every array the harvest writes."""
    return [{"site": site, "layer": layer, "d_in": info.site_width(site)}
            for site, layer in harvest_keys(config.harvest, info.n_layers)]


def create_arrays(config: Config, activations: str, arrays: list[dict], n_rows: int) -> None:
    """Create (or check) the zarr3 array of every (site, layer) for `n_rows` rows."""
    h = config.harvest
    for array in arrays:
        create_array(paths.array_url(activations, array["site"], array["layer"]), n_rows=n_rows,
                     d_in=array["d_in"], dtype=h.store_dtype, shard_rows=h.shard_rows,
                     chunk_rows=h.chunk_rows)


def _header(config: Config, info: ModelInfo) -> dict:
    h = config.harvest
    return {
        "identity": config.harvest_identity(),
        "model": asdict(info),
        "arrays": array_specs(config, info),
        "storage": {"format": h.output_format, "dtype": h.store_dtype, "unit_rows": h.unit_rows,
                    "shard_rows": h.shard_rows, "chunk_rows": h.chunk_rows,
                    "context_length": h.context_length},
    }


class _Pool:
    """Runs calls on a fixed set of actors, one call per actor at a time.

    An actor whose process died is restarted by Ray; it gets work again only after it
    answers a ping, so calls are never sent to an actor that is still restarting.
    """

    PING_INTERVAL_S = 0.5
    RESTART_TIMEOUT_S = 600.0

    def __init__(self, actors: list):
        self.idle = deque(actors)
        self.failed_pings: dict = {}
        self.in_flight: dict = {}  # ObjectRef -> (item, actor)
        self.recovering: dict = {}  # ping ObjectRef -> actor

    def submit(self, item, call) -> None:
        actor = self.idle.popleft()
        self.in_flight[call(actor, item)] = (item, actor)

    def _ping(self, actor) -> None:
        self.recovering[actor.pid.remote()] = actor

    def wait_one(self):
        """(item, result or exception) of the next call to finish; None when an actor is back."""
        (ref,), _ = ray.wait([*self.in_flight, *self.recovering], num_returns=1)
        if ref in self.recovering:
            actor = self.recovering.pop(ref)
            try:
                ray.get(ref)
                self.idle.append(actor)
                self.failed_pings.pop(actor, None)
            except RayActorError as err:
                _raise_if_init_failed(err)
                self.failed_pings[actor] = self.failed_pings.get(actor, 0) + 1
                if self.failed_pings[actor] * self.PING_INTERVAL_S > self.RESTART_TIMEOUT_S:
                    raise UserError(f"a harvest worker did not come back after dying: {_cause(err)!r}") from None
                time.sleep(self.PING_INTERVAL_S)
                self._ping(actor)
            return None
        item, actor = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as err:  # the process died: restart, then reuse
            _raise_if_init_failed(err)
            self._ping(actor)
            return item, err
        except RayTaskError as err:
            result = err
        self.idle.append(actor)
        return item, result


def _raise_if_init_failed(err: RayActorError) -> None:
    """A worker whose constructor raised (no such device, unreadable weights) fails the
    same way on every restart: stop with its error instead of waiting for a restart."""
    if not err.actor_init_failed:
        return
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kind, _, message = lines[-1].partition(": ")
    reason = message if kind.endswith("UserError") and message else lines[-1]
    raise UserError(f"a harvest worker could not start: {reason}")


def _cause(err: Exception) -> BaseException:
    return getattr(err, "cause", None) or err


def _run_all(pool: _Pool, items: list, call, on_done, *, max_attempts: int, what: str) -> None:
    """Run `call` on every item, retrying failures; user errors stop at once."""
    queue = deque(items)
    attempts: dict = {}
    while queue or pool.in_flight:
        while queue and pool.idle:
            pool.submit(queue.popleft(), call)
        finished = pool.wait_one()
        if finished is None:
            continue
        item, result = finished
        if not isinstance(result, Exception):
            on_done(item, result)
            continue
        cause = _cause(result)
        if isinstance(cause, UserError) and not isinstance(cause, storage.StorageUnavailable):
            raise cause  # bad input fails the same way on every attempt
        attempts[item] = attempts.get(item, 0) + 1
        if attempts[item] >= max_attempts:
            raise UserError(f"{what} {item} failed {attempts[item]} times; last error: "
                            f"{storage.describe_error(cause)}")
        log.warning("%s %s failed (attempt %d/%d): %s; retrying", what, item, attempts[item], max_attempts,
                    storage.describe_error(cause))
        queue.appendleft(item)


def run_harvest(config: Config, *, ray_address: str | None = None, progress: bool = True) -> HarvestSummary:
    began = time.perf_counter()
    activations = paths.activations_url(config.run_dir)
    if storage.scheme(activations) == "memory":
        raise ConfigError(f"{config.origin}: run_dir={config.run_dir!r}: memory:// is private to one process; Ray workers need a path or gs://")
    info = model_info(config.model)
    check_layers(config, info)
    last_layer = max(layer for _, layer in harvest_keys(config.harvest, info.n_layers))
    check_checkpoint(config.model, last_layer if config.model.backend == "jax" else None)
    shards = list_shards(config.source)
    storage.makedirs(activations)
    storage.check_writable(activations)
    ledger = HarvestLedger.open_for_harvest(activations, fingerprint=config.harvest_fingerprint(),
                                            header=_header(config, info))
    if ledger.complete:
        log.info("%s is already complete", activations)
        return _summary(ledger, activations, began, 0, 0.0)

    connect(ray_address)
    count, options = actor_options(config)
    threads = int(options.get("num_cpus", 1))
    actors = [HarvestActor.options(**options).remote(config, activations, threads) for _ in range(count)]
    log.info("harvest: %d workers (%s), output %s", count, options, activations)
    pool = _Pool(actors)
    try:
        layout = ledger.layout or _tokenize(config, ledger, shards, pool, count, progress)
        units_run, rows_run, seconds = _harvest_units(config, ledger, layout, activations, pool, progress)
    finally:
        for actor in actors:
            ray.kill(actor)
    summary = _summary(ledger, activations, began, units_run, rows_run / seconds if seconds else 0.0)
    ledger.mark_complete({"rows": summary.rows, "arrays": summary.arrays, "bytes": summary.bytes})
    ledger.save()
    return summary


def _tokenize(config: Config, ledger: HarvestLedger, shards: list[SourceShard], pool: _Pool,
              workers: int, progress: bool) -> Layout:
    budget = config.harvest.max_tokens

    def prefix() -> tuple[int, list[SourceShard]]:
        """Rows in the tokenised prefix, and the next shards to tokenise."""
        total = 0
        for shard in shards:
            if budget is not None and total >= budget:
                return total, []
            stats = ledger.shard_stats(shard.index)
            if stats is None:
                missing = [s for s in shards[shard.index:] if ledger.shard_stats(s.index) is None]
                return total, missing[: 2 * workers]
            total += stats.n_rows
        return total, []

    def done(shard: SourceShard, stats) -> None:
        ledger.record_shard(shard.index, stats)
        ledger.save()
        bar.update(1)

    bar = tqdm(total=len(shards), desc="tokenise", unit="shard", disable=not progress,
               initial=sum(ledger.shard_stats(s.index) is not None for s in shards))
    with bar:
        while True:
            _, wave = prefix()
            if not wave:
                break
            _run_all(pool, wave, lambda actor, shard: actor.tokenize_shard.remote(shard), done,
                     max_attempts=config.harvest.max_attempts, what="source shard")
    stats = [ledger.shard_stats(s.index) for s in shards]
    known = stats[: next((i for i, s in enumerate(stats) if s is None), len(stats))]
    layout = Layout.plan(known, budget, config.harvest.unit_rows)
    if layout.n_rows == 0:
        raise UserError(f"{config.origin}: source: the corpus has no text ({len(shards)} shards, 0 tokens)")
    ledger.set_layout(layout)
    ledger.save()
    return layout


def _harvest_units(config: Config, ledger: HarvestLedger, layout: Layout, activations: str,
                   pool: _Pool, progress: bool) -> tuple[int, int, float]:
    h = config.harvest
    if h.output_format == "zarr3":
        create_arrays(config, activations, ledger.data["arrays"], layout.n_rows)
    committed = ledger.committed_units
    todo = [u for u in range(layout.n_units) if u not in committed]
    done_rows = sum(layout.unit_range(u)[1] - layout.unit_range(u)[0] for u in committed)
    rows_run = 0
    began = time.perf_counter()
    bar = tqdm(total=layout.n_rows, initial=done_rows, desc="harvest", unit="tok", unit_scale=True,
               disable=not progress)

    def done(unit: int, result) -> None:
        nonlocal rows_run
        ledger.commit_unit(unit, {"rows": list(layout.unit_range(unit)), "sequences": result.sequences,
                                  "seconds": round(result.seconds, 3), "crc32c": result.checksums})
        ledger.save()
        rows_run += result.rows
        bar.update(result.rows)

    with bar:
        _run_all(pool, todo, lambda actor, unit: actor.harvest_unit.remote(unit, layout), done,
                 max_attempts=h.max_attempts, what="unit")
    return len(todo), rows_run, time.perf_counter() - began


def _summary(ledger: HarvestLedger, activations: str, began: float, units_run: int,
             tokens_per_s: float) -> HarvestSummary:
    fs, path = storage.filesystem(activations)
    size = int(storage.with_retries(lambda: fs.du(path), what=activations))
    layout = ledger.layout
    info = ledger.data["storage"]
    value_bytes = 2 if info["dtype"] == "bfloat16" else 4
    row_bytes = sum(a["d_in"] for a in ledger.data["arrays"]) * value_bytes
    summary = HarvestSummary(
        activations=activations,
        rows=layout.n_rows if layout else 0,
        arrays=len(ledger.data["arrays"]),
        bytes=size,
        seconds=time.perf_counter() - began,
        units_run=units_run,
        tokens_per_s=tokens_per_s,
        write_mib_s=tokens_per_s * row_bytes / 2**20,
    )
    if units_run:
        log.info("harvest wrote %d units at %.0f tokens/s, %.1f MiB/s of activations", units_run,
                 summary.tokens_per_s, summary.write_mib_s)
    return summary
