"""Scoring new patients with a model bundle: a full extraction against only the bundle's features.

    .venv/bin/python benchmarks/bench_predict.py --config data/demo/hospital_d/site.toml \
        --model runs/demo/federated/model [--patients 20] [--out /tmp/bench-predict]

The first ``--patients`` patients of the site's manifest are extracted twice from their raw files
into folders of their own (cold caches, the site's ``compute.workers``): every radiomics feature
of the site's parameter file (what ``fedmets site extract`` does), and only the features the
bundle reads (what ``fedmets site predict --manifest`` does, ``extract_new_patients``); then the
bundle scores them. Printed: seconds and patients per minute of each extraction, the speed-up,
the scoring seconds, and the largest difference between the two ways' risks (they must agree).
Then each stage of one patient's extraction timed in this process (``--stages`` patients, one
thread): what every patient pays whatever the bundle reads (load, resampling, ring, crops), the
radiomics of each way, and the speed-up that would remain with no fixed cost at all (no site
check, no process pool).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.extract import extract_site
from fedmets.client.ingest import load_patient_images, read_manifest
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.predict import extract_new_patients, new_patients_site, predict_site
from fedmets.client.preprocess import prepare_patient, save_crop
from fedmets.client.radiomics_features import (
    REGIONS,
    extractor_for,
    params_file,
    regions_features,
    restricted_extractor,
    use_one_thread,
    wanted_features,
)
from fedmets.shared.bundle import load_bundle
from fedmets.shared.config import SiteConfig, load_site_config


def stage_seconds(cfg: SiteConfig, features: tuple[str, ...], patients: int, out: Path) -> dict:
    """Mean seconds per patient of each extraction stage, in this process on one thread, over
    the site's first ``patients`` patients: ``load``, ``resample`` (resampling, body and box),
    ``ring``, ``crops`` (writing the image model's input), ``radiomics full`` and ``radiomics
    bundle`` (only ``features``)."""
    use_one_thread()
    records = read_manifest(cfg)[0][:patients]
    params = params_file(cfg.radiomics.params)
    margin = cfg.radiomics.peritumoral_margin_mm
    full, restricted = extractor_for(params), restricted_extractor(params, features)
    regions = {name.split("_", 1)[0] for name in features}
    seconds: dict[str, float] = {}

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        tic = time.perf_counter()
        yield
        seconds[stage] = seconds.get(stage, 0.0) + (time.perf_counter() - tic) / len(records)

    for record in records:
        with timed("load"):
            images = load_patient_images(record, cfg)
        with timed("resample"):
            prepared = prepare_patient(images.ct, images.tumour, cfg.preprocess, margin)
        with timed("ring"):
            air, bone = cfg.preprocess.air_threshold_hu, cfg.preprocess.bone_threshold_hu
            ring = peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, margin, air, bone)
        with timed("crops"):
            save_crop(out / "crop.npz", prepared, ring)
        box = prepared.radiomics_box
        ct = box.crop(prepared.ct)
        masks = dict(zip(REGIONS, (box.crop(prepared.tumour), box.crop(ring)), strict=True))
        with timed("radiomics full"):
            regions_features(full, ct, masks, None)
        with timed("radiomics bundle"):
            needed = {region: mask for region, mask in masks.items() if region in regions}
            regions_features(restricted, ct, needed, wanted_features(features))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--stages", type=int, default=4, help="patients timed stage by stage")
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    out = Path(opts.out or tempfile.mkdtemp(prefix="bench-predict-"))
    cfg = load_site_config(opts.config)
    manifest = pd.read_csv(cfg.data.manifest).head(opts.patients)
    bundle = load_bundle(opts.model)
    timings = {}
    risks = {}
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
    names = tuple(bundle.manifest["radiomics_features"])
    seconds = stage_seconds(cfg, names, opts.stages, out)
    print(f"per patient, one thread, {opts.stages} patients (seconds):")
    for stage, value in seconds.items():
        print(f"  {stage:17s} {value:6.2f}")
    shared = sum(v for k, v in seconds.items() if not k.startswith("radiomics"))
    bound = (shared + seconds["radiomics full"]) / (shared + seconds["radiomics bundle"])
    print(f"speed-up with no fixed cost (every patient's shared stages only): {bound:.1f}x")


if __name__ == "__main__":
    main()
