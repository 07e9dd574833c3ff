"""The ``factorkit`` command.

    factorkit compress --model smollm2-135m --method svdllm --ratio 0.2 --calib shakespeare --out out/svdllm
    factorkit eval --model out/svdllm --text shakespeare
    factorkit finetune --model smollm2-135m --adapter wara --r 8 --text my_notes.txt --out out/wara
    factorkit pretrain --config llama-20m --param sltrain --rank 64 --delta 0.03 --steps 300 --out out/sltrain
    torchrun --nproc-per-node 2 -m factorkit.cli pretrain ...   (data parallel, same loss curve)

Errors a user can cause end in one sentence on stderr and exit status 2,
with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .errors import FactorkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a fraction such as 0.2") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1); pass the fraction of parameters to remove, e.g. 0.2")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_eval_args(p: argparse.ArgumentParser, default_max_chunks: int | None) -> None:
    p.add_argument("--seq-len", type=_positive, default=2048, help="evaluation chunk length in tokens (default 2048)")
    p.add_argument("--max-chunks", type=_positive, default=default_max_chunks,
                   help=f"evaluate at most this many chunks (default {default_max_chunks or 'all'})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype to run the model in (default float32)")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .methods import DEFAULT_METHOD, METHODS

    parser = _Parser(
        prog="factorkit",
        description="Compress transformer models by rewriting their weight matrices as structured factorizations.",
        epilog="Start with: factorkit compress --out out/demo --eval shakespeare   (see `factorkit compress --help`)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    methods = "\n".join(f"  {m.name:8s} {m.summary}" for m in METHODS.values())
    c = sub.add_parser(
        "compress", help="compress a model and save it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replace every Linear layer inside the transformer blocks by a factorization that removes "
                    "--ratio of its parameters, calibrated on --calib, and save the result to --out.",
        epilog=f"methods:\n{methods}\n\nmodels: a folder, a .gguf file, smollm2-135m (built in), or a hub id (online)\n"
               "text:   shakespeare (built in), wikitext2 or c4 (online), or any UTF-8 text file",
    )
    c.add_argument("--model", default="smollm2-135m", help="model to compress (default smollm2-135m)")
    c.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD, help=f"default {DEFAULT_METHOD}")
    c.add_argument("--ratio", type=_ratio, default=0.2, help="fraction of the targeted parameters to remove (default 0.2)")
    c.add_argument("--out", required=True, help="folder to write the compressed model to")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--calib", default="shakespeare", help="calibration text (default: shakespeare, calibration plays)")
    c.add_argument("--calib-samples", type=_positive, default=32, help="calibration sequences (default 32)")
    c.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per calibration sequence (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seed for data splits and sampling (default 0)")
    c.add_argument("--targets", help="comma-separated Linear names to compress, e.g. q_proj,k_proj (default: all)")
    c.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="uniform: every matrix loses --ratio; global: one budget, ranks chosen by predicted loss "
                        "(needs a Fisher gradient pass; default uniform)")
    c.add_argument("--min-rank", type=_positive, default=32,
                   help="global allocation: smallest rank of any matrix, at most the uniform rank (default 32)")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd: exponent of the activation scale (default 0.5)")
    c.add_argument("--fisher-axis", choices=("in", "out"),
                   help="fwsvd: weigh input columns (in, the paper's choice and the default) or output rows (out)")
    c.add_argument("--whiten", action="store_true",
                   help="fwsvd: also whiten the inputs with the Cholesky factor of X^T X (Fisher on the output side)")
    c.add_argument("--no-whiten", action="store_true",
                   help="cospadi: fit the weights instead of the calibration outputs (plain dictionary learning)")
    c.add_argument("--group", type=_positive,
                   help="cospadi: consecutive layers sharing one dictionary per projection type (default 1)")
    c.add_argument("--iterations", type=_positive,
                   help="cospadi: alternations of sparse coding and K-SVD (default 60, the paper's)")
    c.add_argument("--refresh", help="cospadi: when OMP re-codes: doubling (default), every, or every N-th")
    c.add_argument("--rho", type=float, help="cospadi, dsformer: atoms per nonzero, k/s (default 2)")
    c.add_argument("--count", choices=("params", "storage"),
                   help="cospadi, dsformer: --ratio counts parameters (default) or storage incl. support bits")
    c.add_argument("--pattern", help="dsformer: coefficient sparsity, topk (default) or n:m such as 2:4")
    c.add_argument("--blocks", type=_positive, help="dsformer: groups of output rows with their own basis (default 1)")
    c.add_argument("--init", choices=("svd", "cospadi", "random"), help="dsformer: starting factorization (default svd)")
    c.add_argument("--no-stf", action="store_true",
                   help="dsformer: freeze the support after init (the ablation of the Straight-Through Factorizer)")
    c.add_argument("--train-steps", type=_positive, help="dsformer: optimizer steps (default 200)")
    c.add_argument("--lr", type=float, help="dsformer: AdamW learning rate (default 1e-4)")
    c.add_argument("--train-batch-size", type=_positive, help="dsformer: sequences per micro-batch (default 4)")
    c.add_argument("--grad-accum", type=_positive, help="dsformer: micro-batches per optimizer step (default 1)")
    c.add_argument("--distill", type=float, help="dsformer: weight of the KL to the dense model's logits (default 0)")
    c.add_argument("--checkpoint-dir",
                   help="dsformer: save the training state here every 50 steps; cospadi: keep every finished "
                   "group of blocks here; a rerun resumes from it")
    c.add_argument("--fisher-samples", type=_positive,
                   help="fwsvd / global allocation: calibration sequences used for the gradient pass (default all)")
    c.add_argument("--batch-size", type=_positive, default=4, help="calibration sequences per forward pass (default 4)")
    c.add_argument("--eval", metavar="TEXT", help="also measure perplexity before and after on this text (held-out split)")
    _add_eval_args(c, default_max_chunks=16)

    e = sub.add_parser("eval", help="perplexity of a model on a text",
                       description="Perplexity over non-overlapping chunks of --text (for shakespeare, the held-out plays).")
    e.add_argument("--model", default="smollm2-135m", help="a saved factorkit folder or any model factorkit can load")
    e.add_argument("--text", default="shakespeare", help="shakespeare, wikitext2, c4 or a text file (default shakespeare)")
    e.add_argument("--seed", type=int, default=0, help="seed of the shakespeare split (default 0)")
    _add_eval_args(e, default_max_chunks=None)

    from .models.llama import PRETRAIN_CONFIGS

    p = sub.add_parser(
        "pretrain", help="pretrain a small LLaMA from scratch (full rank, low rank or SLTrain)",
        description="Train a LLaMA-style model from scratch on --text with every Linear in its blocks full rank, "
                    "low rank (U V) or SLTrain's sparse + low rank (B A + S on a fixed random support), evaluate "
                    "held-out perplexity as it goes, and save it to --out. Under torchrun it trains data parallel "
                    "(DistributedDataParallel, or FSDP2 with --parallel fsdp; gloo on CPUs, NCCL on GPUs) with the "
                    "same global batch.",
    )
    p.add_argument("--config", default="llama-20m",
                   help=f"model shape: {', '.join(PRETRAIN_CONFIGS)} or a LlamaConfig JSON file (default llama-20m)")
    p.add_argument("--param", choices=("full", "lowrank", "sltrain"), default="sltrain",
                   help="parameterization of the block Linears (default sltrain)")
    p.add_argument("--rank", type=_positive, help="rank of the low-rank part (default: a quarter of the hidden size)")
    p.add_argument("--delta", type=float, default=0.03, help="sltrain: density of the sparse part (default 0.03)")
    p.add_argument("--alpha", type=float, default=32.0, help="sltrain: the low-rank part is scaled by alpha/rank (default 32)")
    p.add_argument("--steps", type=_positive, default=300, help="optimizer steps (default 300)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default 3e-3, the paper's for SLTrain)")
    p.add_argument("--warmup", type=int, help="steps of linear warm-up before the cosine decay (default 10%% of --steps)")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="sequences per micro-batch, all processes together (default 16)")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--text", default="shakespeare",
                   help="training text: shakespeare (calibration plays; the others held out), wikitext2, c4 or a "
                        "text file (its last 10%% held out) (default shakespeare)")
    p.add_argument("--tokenizer", default="bpe-4096",
                   help="bpe-N (trained on the training text) or a model's tokenizer, e.g. smollm2-135m (default bpe-4096)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of weights, gradients and optimizer state (default float32)")
    p.add_argument("--eval-every", type=_positive, default=100, help="held-out evaluation every N steps (default 100)")
    p.add_argument("--eval-rows", type=_positive, default=64, help="held-out sequences evaluated (default 64)")
    p.add_argument("--checkpoint-dir", help="save the training state here every --checkpoint-every steps; a rerun resumes")
    p.add_argument("--checkpoint-every", type=_positive, default=100, help="default 100")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, sparse supports and batch order (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train: auto (a GPU when there is one; one per process under torchrun), cpu, cuda")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp replicates the model on every process, fsdp shards parameters, "
                        "gradients and optimizer state over them (FSDP2) (default ddp)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak tensor memory of one training step (profiler on CPU; slower start)")
    p.add_argument("--out", required=True, help="folder to write the trained model and its tokenizer to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    f = sub.add_parser(
        "finetune", help="fine-tune a causal LM with a WaRA or LoRA adapter (or fully) on a text",
        description="Fine-tune --model on the training part of --text with a WaRA adapter (low rank in the wavelet "
                    "domain), a LoRA adapter (PEFT) or all weights, report held-out perplexity before and after, and "
                    "save the adapter (or the model, for full) to --out.",
    )
    f.add_argument("--model", default="smollm2-135m", help="model to fine-tune (default smollm2-135m)")
    f.add_argument("--adapter", choices=("wara", "lora", "full"), default="wara", help="default wara")
    f.add_argument("--r", type=_positive, default=8, help="adapter rank (default 8)")
    f.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / r (default 16)")
    f.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout (default 0)")
    f.add_argument("--wavelet", default="db2", help="wara: orthogonal wavelet, e.g. haar, db2, db4, sym4 (default db2)")
    f.add_argument("--levels", type=_positive, default=2, help="wara: levels of the 2-D transform (default 2)")
    f.add_argument("--targets", help="comma-separated Linear names to adapt, e.g. q_proj,v_proj (default: all)")
    f.add_argument("--text", default="shakespeare",
                   help="shakespeare (calibration plays; the others held out), wikitext2, c4 or a text file "
                        "(its last 10%% held out) (default shakespeare)")
    f.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default 256)")
    f.add_argument("--batch-size", type=_positive, default=4, help="sequences per micro-batch (default 4)")
    f.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per optimizer step (default 1)")
    f.add_argument("--steps", type=_positive, default=200, help="optimizer steps (default 200)")
    f.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate (default 2e-4)")
    f.add_argument("--eval-rows", type=_positive, default=32, help="held-out sequences evaluated (default 32)")
    f.add_argument("--checkpoint-dir", help="save the training state here every 50 steps; a rerun resumes")
    f.add_argument("--seed", type=int, default=0, help="batch order and text split (default 0)")
    f.add_argument("--out", required=True, help="folder for the adapter (wara, lora) or the model (full)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _method_config(args: argparse.Namespace):
    from .methods import get_method

    method = get_method(args.method)
    kwargs = {"ratio": args.ratio, "batch_size": args.batch_size}
    if args.targets:
        kwargs["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.whiten and args.no_whiten:
        raise FactorkitError("--whiten and --no-whiten contradict each other; give one.")
    whiten = True if args.whiten else False if args.no_whiten else None
    options = {"alpha": args.alpha, "allocation": args.allocation, "min_rank": args.min_rank,
               "fisher_axis": args.fisher_axis, "whiten": whiten, "fisher_samples": args.fisher_samples,
               "group": args.group, "iterations": args.iterations, "refresh": args.refresh, "rho": args.rho,
               "count": args.count, "pattern": args.pattern, "blocks": args.blocks, "init": args.init,
               "stf": False if args.no_stf else None, "train_steps": args.train_steps, "lr": args.lr,
               "train_batch_size": args.train_batch_size, "grad_accum": args.grad_accum, "distill": args.distill,
               "checkpoint_dir": args.checkpoint_dir}
    # options only some methods have: an explicit value for another method is a mistake
    specific = {"fisher_axis": "fwsvd", "group": "cospadi", "iterations": "cospadi", "refresh": "cospadi",
                "rho": "cospadi or dsformer", "count": "cospadi or dsformer",
                "checkpoint_dir": "cospadi or dsformer"}
    specific.update({name: "dsformer" for name in ("pattern", "blocks", "init", "train_steps", "lr",
                                                   "train_batch_size", "grad_accum", "distill")})
    fields = method.config_cls.__dataclass_fields__
    for name, value in options.items():
        if name in fields:
            if value is not None:
                kwargs[name] = value
        elif name in specific and value is not None:
            raise FactorkitError(f"--{name.replace('_', '-')} applies to --method {specific[name]} only.")
        elif name == "stf" and value is not None:
            raise FactorkitError("--no-stf applies to --method dsformer only.")
        elif name == "whiten" and value is not None:
            raise FactorkitError(f"--{'whiten' if value else 'no-whiten'} applies to --method fwsvd or cospadi only.")
    return method.config_cls(**kwargs)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights appear once


def cmd_compress(args: argparse.Namespace) -> None:
    from . import api
    from .data import calibration_tokens, eval_tokens
    from .eval import perplexity
    from .models import load
    from .models.files import check_writable_target, folder_size
    from .report import fmt_bytes, fmt_count, fmt_ppl, print_table

    config = _method_config(args)
    config.validate()
    out = Path(args.out)
    check_writable_target(out, args.overwrite)  # fail before any long work
    progress = not args.quiet

    model, tokenizer = load(args.model, DTYPES[args.dtype])
    if tokenizer is None:
        raise FactorkitError(f"{args.model} has no tokenizer files; save the tokenizer beside the model.")
    data = None
    if config.uses_data():
        data = calibration_tokens(tokenizer, args.calib, args.calib_samples, args.calib_seq_len, args.seed)
    chunks = eval_tokens(tokenizer, args.eval, args.seq_len, args.max_chunks, args.seed) if args.eval else None
    before_bytes = _weight_bytes(model)
    before_ppl = None
    if chunks is not None:
        t = time.perf_counter()
        before_ppl = (perplexity(model, chunks, progress=progress, desc="perplexity (dense)"), time.perf_counter() - t)

    t = time.perf_counter()
    api.compress(model, config, data, progress=progress)
    compress_time = time.perf_counter() - t
    summary = api.summarize(model)
    api.save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)

    rows = [
        ["parameters (model)", fmt_count(summary.model_params_before), fmt_count(summary.model_params_after)],
        ["parameters (targeted matrices)", fmt_count(summary.targeted_dense_params), fmt_count(summary.targeted_params)],
        # before: the dense weights as save() would write them; after: the file written
        [f"file size (model.safetensors, {args.dtype})", fmt_bytes(before_bytes), fmt_bytes(folder_size(out))],
        ["compression wall time", "", f"{compress_time:.1f} s"],
    ]
    if before_ppl is not None:
        t = time.perf_counter()
        after = perplexity(model, chunks, progress=progress, desc="perplexity (compressed)")
        after_time = time.perf_counter() - t
        rows.insert(0, [f"perplexity ({args.eval}, {after.tokens} tokens)", fmt_ppl(before_ppl[0].perplexity), fmt_ppl(after.perplexity)])
        rows.append(["evaluation wall time", f"{before_ppl[1]:.1f} s", f"{after_time:.1f} s"])
    print_table(
        f"{args.model}: {args.method} at ratio {args.ratio}"
        + (" (global ranks)" if getattr(config, "allocation", "uniform") == "global" else ""),
        ["", "before", "after"], rows,
        caption=f"Removed {summary.ratio_targeted:.1%} of the parameters of the {summary.factor_modules} targeted "
                f"matrices, {summary.ratio_model:.1%} of the model (parameters counted; "
                + (f"{summary.ratio_targeted_storage:.1%} counting the {fmt_bytes(summary.targeted_index_bits // 8)} "
                   "of support masks)." if summary.targeted_index_bits else "low-rank factors store no indices)."))
    print(f"saved to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from . import api
    from .data import eval_tokens
    from .eval import perplexity
    from .models import load
    from .report import fmt_count, fmt_ppl, print_table

    model, tokenizer = load(args.model, DTYPES[args.dtype])
    if tokenizer is None:
        raise FactorkitError(f"{args.model} has no tokenizer files; save the tokenizer beside the model.")
    chunks = eval_tokens(tokenizer, args.text, args.seq_len, args.max_chunks, args.seed)
    t = time.perf_counter()
    result = perplexity(model, chunks, progress=not args.quiet)
    elapsed = time.perf_counter() - t
    summary = api.summarize(model)
    info = getattr(model, "factorkit_compression", None)
    rows = [
        ["perplexity", fmt_ppl(result.perplexity)],
        ["tokens counted", f"{result.tokens} ({result.chunks} chunks of {result.seq_len})"],
        ["dtype", result.dtype],
        ["parameters", fmt_count(summary.model_params_after)],
        ["compression", f"{info['method']}, {summary.ratio_targeted:.1%} of targeted parameters removed" if info else "none"],
        ["wall time", f"{elapsed:.1f} s"],
    ]
    print_table(f"{args.model} on {args.text}", ["", "value"], rows)


def cmd_pretrain(args: argparse.Namespace) -> None:
    import torch.distributed as tdist

    from .models import save
    from .models.files import check_writable_target
    from .report import fmt_bytes, fmt_count, fmt_ppl, print_table
    from .workflows.pretrain import PretrainConfig, leave_distributed, pretrain

    config = PretrainConfig(model=args.config, param=args.param, rank=args.rank, density=args.delta, alpha=args.alpha,
                            text=args.text, tokenizer=args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, steps=args.steps, lr=args.lr, warmup=args.warmup,
                            dtype=args.dtype, eval_every=args.eval_every, eval_rows=args.eval_rows,
                            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.seed,
                            device=args.device, parallel=args.parallel)
    config.validate()
    out = Path(args.out)
    check_writable_target(out, args.overwrite)  # fail before any long work
    failed = True
    try:
        result = pretrain(config, progress=not args.quiet, measure_memory=args.memory)
        rank = tdist.get_rank() if tdist.is_initialized() else 0
        if rank == 0:  # only rank 0 writes and reports
            save(result.model, out, tokenizer=result.tokenizer, overwrite=args.overwrite)
        failed = False
    finally:
        leave_distributed(failed)
    if rank != 0:
        return
    last = result.evals[-1] if result.evals else {}
    info = result.params
    rows = [
        ["held-out perplexity", fmt_ppl(last["perplexity"]) if last else "not evaluated"],
        ["final training loss", f"{result.losses[-1]:.4f}" if result.losses else "no step run"],
        ["parameters (total / in the blocks)", f"{fmt_count(info['params_total'])} / {fmt_count(info['params_blocks'])}"],
        ["trainable parameters", fmt_count(info["params_trainable"])],
        ["training tokens (this call)", f"{result.tokens} in {result.seconds:.1f} s "
                                        f"({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)"],
    ]
    if "optimizer_state_bytes" in info:
        rows += [["AdamW state", fmt_bytes(info["optimizer_state_bytes"])],
                 ["peak tensor memory of a step", fmt_bytes(info["peak_step_bytes"])]]
    print_table(f"pretrain {args.config} ({args.param}) on {args.text}", ["", "value"], rows)
    print(f"saved to {out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .models.files import check_writable_target
    from .report import fmt_count, fmt_ppl, print_table
    from .workflows.finetune import FinetuneConfig, finetune, save_finetuned

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    config = FinetuneConfig(model=args.model, adapter=args.adapter, r=args.r, alpha=args.alpha, dropout=args.dropout,
                            wavelet=args.wavelet, levels=args.levels, target_modules=targets, text=args.text,
                            seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            steps=args.steps, lr=args.lr, eval_rows=args.eval_rows,
                            checkpoint_dir=args.checkpoint_dir, seed=args.seed)
    config.validate()
    out = Path(args.out)
    check_writable_target(out, args.overwrite)  # fail before any long work
    result = finetune(config, progress=not args.quiet)
    save_finetuned(result, config, out, args.overwrite)
    rows = [
        ["held-out perplexity", fmt_ppl(result.perplexity_before), fmt_ppl(result.perplexity_after)],
        ["trainable parameters", "", f"{fmt_count(result.trainable)} of {fmt_count(result.total)}"],
        ["training wall time", "", f"{result.seconds:.1f} s ({result.seconds / max(1, result.steps_run):.2f} s/step)"],
    ]
    print_table(f"finetune {args.model} with {args.adapter} (r={args.r}) on {args.text}", ["", "before", "after"], rows)
    print(f"saved to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        {"compress": cmd_compress, "eval": cmd_eval, "pretrain": cmd_pretrain,
         "finetune": cmd_finetune}[args.command](args)
    except FactorkitError as exc:
        print(f"factorkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "checkpoint_dir", None)
        print("factorkit: interrupted; " + (f"rerun the same command to resume from the last checkpoint in {resume}."
                                            if resume else "nothing was written."), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
