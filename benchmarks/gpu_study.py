"""The centralised study on a packed cohort, its image tasks in parallel on one GPU: the study
half of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_study.py --packed .gpu/demo.npz --out OUT [--preset paper]
        [--backbones swin3d,resnet3d,densenet3d] [--parallel auto] [--seed 0] [--folds N]

Unpacks the cohort (``fedmets.simulation.packed_cohort``) into ``OUT/crops``, runs
``fedmets.simulation.study.run_study`` (every fold x backbone image task at once where the GPU's
memory holds them) and writes ``OUT/metrics.json``, ``OUT/oof_predictions.csv``, the figures, and
prints the progress lines, every model's pooled AUC with its 95% CI, the paired DeLong tests
(each fused model against its single groups, the first backbone against the others) and the
wall time per stage.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from fedmets.simulation.packed_cohort import unpack_cohort
from fedmets.simulation.study import PRESETS, run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--backbones", default="swin3d,resnet3d,densenet3d")
    parser.add_argument("--parallel", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    data = unpack_cohort(args.packed, args.out / "crops")
    say(f"unpacked {len(data.ids)} patients ({int(data.labels.sum())} DM+) from {args.packed}")
    parallel = args.parallel if args.parallel == "auto" else int(args.parallel)
    result = run_study(
        data,
        PRESETS[args.preset],
        args.out,
        folds=args.folds,
        seed=args.seed,
        backbones=args.backbones.split(","),
        device=args.device,
        log=say,
        parallel=parallel,
    )
    shutil.rmtree(args.out / "crops")
    metrics = result.metrics
    cfg = metrics["config"]
    print(
        f"\n{cfg['folds']}-fold CV, {cfg['n_patients']} patients ({cfg['positives']} DM+), preset"
        f" {args.preset}, seed {cfg['seed']}, device {cfg['device']},"
        f" {cfg['parallel_tasks']} tasks at once; oracle AUC {metrics['oracle_auc_used']}"
    )
    print(f"{'model':38s} {'AUC':>6s} {'95% CI':>15s} {'ACC':>6s} {'SEN':>6s} {'SPE':>6s}")
    for key, model in metrics["models"].items():
        p = model["pooled"]
        ci = p["auc_ci"] or (float("nan"), float("nan"))
        print(
            f"{key:38s} {p['auc']:6.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {p['acc']:6.3f}"
            f" {p['sen']:6.3f} {p['spe']:6.3f}"
        )
    print("\npaired DeLong tests (AUC difference [95% CI], p)")
    for key, model in metrics["models"].items():
        for name in ("versus_single_groups", "versus_other_backbones"):
            for other, test in model.get(name, {}).items():
                low, high = test["ci"]
                print(
                    f"{key:38s} vs {other:32s} {test['auc_difference']:+.3f}"
                    f" [{low:+.3f}, {high:+.3f}] p {test['p']:.3f}"
                )
    print(f"\ntiming (s, summed over tasks; total is wall): {metrics['timing_s']}")


if __name__ == "__main__":
    main()
