"""Scoring new patients with a model bundle: a full extraction against only the bundle's features.

    .venv/bin/python benchmarks/bench_predict.py --config data/demo/hospital_d/site.toml \
        --model runs/demo/federated/model [--patients 20] [--out /tmp/bench-predict]

The first ``--patients`` patients of the site's manifest are extracted twice from their raw files
into folders of their own (cold caches, the site's ``compute.workers``): every radiomics feature
of the site's parameter file (what ``fedmets site extract`` does), and only the features the
bundle reads (what ``fedmets site predict --manifest`` does, ``extract_new_patients``); then the
bundle scores them. Printed: seconds and patients per minute of each extraction, the speed-up,
the scoring seconds, and the largest difference between the two ways' risks (they must agree).
Then each extraction's mean seconds per patient and stage (its report's
``mean_stage_seconds``): what every patient pays whatever the bundle reads (load, resampling,
ring, crops), the radiomics of each way, and the speed-up that would remain with no fixed cost
at all (no site check, no process pool).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.extract import extract_site
from fedmets.client.predict import extract_new_patients, new_patients_site, predict_site
from fedmets.client.site_files import REPORT_FILE
from fedmets.shared.bundle import load_bundle
from fedmets.shared.config import load_site_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    out = Path(opts.out or tempfile.mkdtemp(prefix="bench-predict-"))
    cfg = load_site_config(opts.config)
    manifest = pd.read_csv(cfg.data.manifest).head(opts.patients)
    bundle = load_bundle(opts.model)
    timings = {}
    risks = {}
    stages = {}
    for way in ("full", "bundle"):
        folder = out / way
        folder.mkdir(parents=True, exist_ok=True)
        listed = folder / "patients.csv"
        manifest.to_csv(listed, index=False)
        paths = {"cache": folder / "cache", "output": folder / "output"}
        local = cfg.model_copy(update={"paths": cfg.paths.model_copy(update=paths)})
        tic = time.perf_counter()
        if way == "full":
            site = new_patients_site(local, listed)
            extract_site(site, labelled=False)
        else:
            site = extract_new_patients(local, opts.model, listed)
        timings[way] = time.perf_counter() - tic
        report = json.loads((site.paths.output / REPORT_FILE).read_text())
        stages[way] = report["mean_stage_seconds"]
        tic = time.perf_counter()
        risks[way] = predict_site(site, opts.model)["risk"].to_numpy()
        timings[f"{way} scoring"] = time.perf_counter() - tic
    n = len(manifest)
    features = len(bundle.manifest["radiomics_features"])
    main_model = bundle.manifest["main_model"]
    print(f"{n} patients of {cfg.site_id}; bundle {main_model} reads {features} radiomics features")
    for way in ("full", "bundle"):
        rate = 60 * n / timings[way]
        print(
            f"{way:7s} extraction {timings[way]:7.1f} s ({rate:6.1f} patients/min),"
            f" scoring {timings[f'{way} scoring']:.1f} s"
        )
    print(f"speed-up of the extraction: {timings['full'] / timings['bundle']:.1f}x")
    difference = float(np.max(np.abs(risks["full"] - risks["bundle"])))
    print(f"largest risk difference between the two: {difference:.2e}; in {out}")
    print("mean seconds per patient inside a worker, per stage (the extraction reports):")
    print(f"  {'stage':12s} {'full':>6s} {'bundle':>6s}")
    for stage in stages["full"]:
        print(f"  {stage:12s} {stages['full'][stage]:6.2f} {stages['bundle'][stage]:6.2f}")
    shared = sum(v for k, v in stages["bundle"].items() if k != "radiomics")
    bound = (shared + stages["full"]["radiomics"]) / (shared + stages["bundle"]["radiomics"])
    print(f"speed-up with no fixed cost (every patient's shared stages only): {bound:.1f}x")


if __name__ == "__main__":
    main()
