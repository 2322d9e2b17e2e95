"""Command line: `python -m aft_timm.autoregressive {train,eval,sample} ...` (see --help of each)."""
import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

from .checkpoint import CheckpointError
from .evaluate import run_eval
from .model import list_models
from .sample import run_sample
from .train import TrainConfig, train


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """["depth=2", "mixer=aft_full"] -> {"depth": 2, "mixer": "aft_full"} (values are Python literals or strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aft_timm.autoregressive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig

    t = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    t.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    t.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. depth=2 dim=64 mixer=aft_full")
    t.add_argument("--dataset", required=True, help="cifar10, enwik8 or bytes:PATH")
    t.add_argument("--data-dir", default=d.data_dir, help="dataset storage / download directory (default: %(default)s)")
    t.add_argument("--seq-len", type=int, help="context length (byte datasets; overrides the model's seq_len)")
    t.add_argument("--batch-size", type=int, required=True, help="global batch size over all processes")
    t.add_argument("--max-steps", type=int, required=True, help="optimizer steps; the cosine schedule ends there")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s, paper)")
    t.add_argument("--weight-decay", type=float, help="default: 0.1 for cifar10, 0.5 for byte data (paper)")
    t.add_argument("--warmup-steps", type=int, help="default: 5%% of --max-steps")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="max gradient norm, 0 disables (default: %(default)s)")
    t.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                   help="micro-batches per step and process (default: %(default)s)")
    t.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps (default: %(default)s)")
    t.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="held-out batches per periodic evaluation (default: %(default)s)")
    t.add_argument("--log-interval", type=int, default=d.log_interval, help="steps (default: %(default)s)")
    t.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval,
                   help="steps (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    t.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
                   help="auto (default): bf16 autocast on CUDA devices that support it, float32 otherwise")
    t.add_argument("--device", help="default: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu")
    t.add_argument("--output", required=True, help="run directory (checkpoints, log.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")

    e = sub.add_parser("eval", help="bits/dim or bits/char over a whole split; prints JSON on the last line")
    e.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or hf-hub:OWNER/NAME")
    e.add_argument("--dataset", required=True, help="cifar10, enwik8 or bytes:PATH")
    e.add_argument("--split", default="test", help="train, val or test (cifar10: train or test)")
    e.add_argument("--data-dir", default=d.data_dir, help="(default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    e.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    e.add_argument("--device")

    s = sub.add_parser("sample", help="write samples: a PNG grid (images) or UTF-8 text (bytes)")
    s.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or hf-hub:OWNER/NAME")
    s.add_argument("--num", type=int, default=16, help="number of samples (default: %(default)s)")
    s.add_argument("--output", required=True)
    s.add_argument("--max-new-tokens", type=int, help="text: bytes to generate (default: fill the context)")
    s.add_argument("--prompt", default="", help="text: UTF-8 prompt to continue")
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    s.add_argument("--top-k", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            model_kwargs = parse_kwargs(args.model_kwargs)
            if args.seq_len is not None:
                model_kwargs["seq_len"] = args.seq_len
            cfg = TrainConfig(
                model=args.model, dataset=args.dataset, batch_size=args.batch_size, max_steps=args.max_steps,
                output=args.output, model_kwargs=model_kwargs, data_dir=args.data_dir, lr=args.lr,
                weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
                grad_accum_steps=args.grad_accum_steps, eval_interval=args.eval_interval,
                eval_batches=args.eval_batches, log_interval=args.log_interval,
                checkpoint_interval=args.checkpoint_interval, seed=args.seed, precision=args.precision,
                device=args.device, resume=args.resume,
            )
            print(json.dumps(train(cfg)))
        elif args.command == "eval":
            print(json.dumps(run_eval(args.checkpoint, args.dataset, args.split, args.data_dir, args.batch_size,
                                      args.device, args.precision)))
        else:
            path = run_sample(args.checkpoint, args.num, args.output, args.max_new_tokens, args.temperature,
                              args.top_k, args.prompt, args.seed, args.device)
            print(f"wrote {path}")
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
