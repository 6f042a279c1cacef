"""Cost of one KC-EMA consolidation at ZeRO stages 0 and 3 against a plain `torch._foreach_lerp_`.

Two gloo ranks on this machine (one thread each). For every model and stage, each rank holds a teacher
partitioned like the student and consolidates it `--repeats` times from a trained student engine; the
baseline is `torch._foreach_lerp_` over fresh tensors of exactly the shapes the consolidation touches
on that rank (its parameter slices and the BatchNorm buffers). Reported per rank 0: milliseconds per
update, the ratio to the baseline, the teacher's bytes on the rank, the bytes any collective moved during
the consolidations (must be 0), and the largest difference from a float64 EMA of the whole model.

    .venv/bin/python bench/consolidation.py            # writes bench/results/consolidation.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from iil_dist.config import from_dict  # noqa: E402
from iil_dist.engine.deepspeed_config import deepspeed_config  # noqa: E402
from iil_dist.engine.dist import average_buffers_  # noqa: E402
from iil_dist.engine.local_group import count_collectives, finish_rank, init_rank, spawn  # noqa: E402
from iil_dist.engine.teacher import Teacher  # noqa: E402
from iil_dist.engine.zero import full_state_dict, local_partitions  # noqa: E402
from iil_dist.models import build_model  # noqa: E402

ALPHA = 0.9
MODELS = {"small_cnn": (1, 16), "resnet18_cifar": (3, 32)}  # name: (channels, image side)


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _measure(model_name: str, stage: int, repeats: int, world: int, rank: int) -> dict:
    import deepspeed

    channels, side = MODELS[model_name]
    cfg = from_dict({}, [f"dist.zero_stage={stage}", "optim.batch_size=8"])
    torch.manual_seed(0)
    teacher = Teacher(build_model(model_name, num_classes=10, in_channels=channels), zero_stage=stage, micro_batch=8)
    torch.manual_seed(1)
    model = build_model(model_name, num_classes=10, in_channels=channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    torch.manual_seed(100 + rank)
    engine.train()
    x, y = torch.randn(8, channels, side, side), torch.randint(0, 10, (8,))
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    average_buffers_(engine.module)

    # the float64 reference: with the student fixed, n updates give s + alpha^n (t0 - s)
    t0 = {k: v.double() for k, v in teacher.full_state_dict().items()}
    student = {k: v.double() for k, v in full_state_dict(engine.module).items()}

    with count_collectives() as calls:
        seconds = _timed(lambda: teacher.consolidate_(engine, ALPHA), repeats)
    num_updates = repeats + 2
    got = teacher.full_state_dict()
    diff = max(
        (got[k].double() - (student[k] + ALPHA**num_updates * (t0[k] - student[k]))).abs().max().item()
        for k in got
        if got[k].is_floating_point()
    )

    touched = [*local_partitions(teacher.module), *(b for b in teacher.module.buffers() if b.is_floating_point())]
    dst = [torch.zeros_like(t) for t in touched]
    src = [torch.randn_like(t) for t in touched]
    lerp_seconds = _timed(lambda: torch._foreach_lerp_(dst, src, 1 - ALPHA), repeats)
    result = {
        "model": model_name,
        "stage": stage,
        "elements_per_rank": sum(t.numel() for t in touched),
        "teacher_bytes_per_rank": teacher.local_bytes(),
        "ms_per_update": 1e3 * seconds,
        "ms_foreach_lerp": 1e3 * lerp_seconds,
        "ratio_to_foreach_lerp": seconds / lerp_seconds,
        "bytes_communicated": sum(b for _, b in calls),
        "collective_calls": len(calls),
        "max_abs_diff_vs_float64": diff,
    }
    engine.destroy()
    teacher.destroy()
    return result


def _worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    init_rank(rank, world, port)
    rows = [_measure(m, s, repeats, world, rank) for m in MODELS for s in (0, 3)]
    if rank == 0:
        Path(out).write_text(json.dumps({"world_size": world, "alpha": ALPHA, "rows": rows}, indent=2) + "\n")
    finish_rank()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "consolidation.json"))
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    spawn(_worker, 2, args.repeats, args.out)
    report = json.loads(Path(args.out).read_text())
    rows = report["rows"]
    print(f"KC-EMA consolidation, {report['world_size']} gloo ranks, rank 0 (median of {args.repeats})")
    print(f"{'model':<15} {'stage':>5} {'elements':>10} {'teacher MB':>10} {'ms/update':>10} "
          f"{'ms lerp':>8} {'ratio':>6} {'comm B':>7} {'max diff':>9}")  # fmt: skip
    for r in rows:
        megabytes = r["teacher_bytes_per_rank"] / 2**20
        print(
            f"{r['model']:<15} {r['stage']:>5} {r['elements_per_rank']:>10} {megabytes:>10.3f} "
            f"{r['ms_per_update']:>10.3f} {r['ms_foreach_lerp']:>8.3f} {r['ratio_to_foreach_lerp']:>6.2f} "
            f"{r['bytes_communicated']:>7} {r['max_abs_diff_vs_float64']:>9.1e}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
