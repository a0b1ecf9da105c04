"""One PyTorch SAE trainer's training step, timed on request.

`gemmascope bench peers` runs this file with the Python of the peers' own environment
(torch, sae-lens, eai-sparsify; `make bench-peers` builds it), so it imports nothing of
gemmascope. Each trainer's step is the library's own, as its trainer runs it:

- saelens-jumprelu: SAELens' `JumpReLUTrainingSAE` through `SAETrainer.step` (forward,
  the L0 step penalty, backward, gradient-norm clipping, Adam, firing statistics);
- saelens-topk: `TopKTrainingSAE` (k latents per row) through `SAETrainer.step`;
- saelens-batchtopk: `BatchTopKTrainingSAE` (k per row on average, its running global
  threshold) through `SAETrainer.step`;
- saelens-matryoshka: `MatryoshkaBatchTopKTrainingSAE` with prefixes of 1/8, 1/4, 1/2
  and all of the width (gemmascope's default 4 levels) through `SAETrainer.step`;
- sparsify-topk: EleutherAI sparsify's `SparseCoder` as its `Trainer` steps it: decoder
  rows to unit norm, forward (its fused top-k encoder), FVU backward, removal of the
  decoder gradient's component along its rows, Adam.

After building the SAE and one warm-up step it prints one JSON line (versions, threads);
then, for each line "N" on its input, it runs N steps and prints {"seconds": best}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _saelens_step(kind: str, d_in: int, width: int, batch: int, k: int):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if kind == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=width, dtype="float32", device="cpu"))
    elif kind == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float32", device="cpu"))
    elif kind == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float32",
                                                              device="cpu"))
    else:
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )

        widths = [width // 8, width // 4, width // 2, width]
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=width, k=k, matryoshka_widths=widths, dtype="float32", device="cpu"))
    config = SAETrainerConfig(total_training_samples=batch * 10**6, train_batch_size_samples=batch, lr_end=3e-4)
    trainer = SAETrainer(cfg=config, sae=sae, data_provider=iter(()))

    def step(x):
        trainer.step(x)
        trainer.n_training_steps += 1

    return sae, step


def _sparsify_step(d_in: int, width: int, k: int):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)

    def step(x):
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return sae, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trainer", choices=["saelens-jumprelu", "saelens-topk", "saelens-batchtopk", "saelens-matryoshka",
                                            "sparsify-topk"])
    parser.add_argument("--d-in", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l0-fraction", type=float, default=None,
                        help="JumpReLU: each threshold at its latent's (1 - fraction) quantile on the batch")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    if args.trainer == "sparsify-topk":
        _, step = _sparsify_step(args.d_in, args.width, args.k)
        from importlib.metadata import version

        library = f"eai-sparsify {version('eai-sparsify')}"
    else:
        sae, step = _saelens_step(args.trainer.removeprefix("saelens-"), args.d_in, args.width, args.batch, args.k)
        if args.l0_fraction is not None:
            with torch.no_grad():
                pre = x @ sae.W_enc + sae.b_enc
                sae.threshold.copy_(torch.quantile(pre, 1.0 - args.l0_fraction, dim=0).clamp(min=1e-3))
        import sae_lens

        library = f"sae-lens {sae_lens.__version__}"
    step(x)
    print(json.dumps({"ready": args.trainer, "library": library, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        best = float("inf")
        for _ in range(int(line)):
            began = time.perf_counter()
            step(x)
            best = min(best, time.perf_counter() - began)
        print(json.dumps({"seconds": best}), flush=True)


if __name__ == "__main__":
    main()
