"""RAVDESS speech recipes side by side on one GPU machine: encoder extraction speed, then
5-fold speaker-independent cross-validation of each run config, all folds in parallel.

It runs msata's own code (the Whisper port, log-mel, ``ClipDataset``, ``train_model``, the
fold splitter, the metrics) on features held in memory-mapped ``.npy`` files instead of a
Zarr store, because a lent GPU machine is bare (no zarr, prefect, mlflow or ffmpeg) and
reaches nothing: the audio (FLAC, read with soundfile) and the encoder weights travel with
the command. Folds, model choice on validation actors and test scoring are those of
``msata train`` (``modeling.data.splits.make_folds``, best validation UAR, the test actors scored
by the model chosen there, after its refit and with its probe when the config has them). One
difference: each fold process reads its own batches (``num_workers = 0`` whatever the config
says: 15 fold processes share 16 cores), so its data-wait share is not that of a GPU worker
with loader processes (docs/benchmarks.md, "On one H100").

Two steps:

    # here, where the weight packages are installed (sha256 checked on load):
    python bench/gpu_ravdess.py export-weights --out .devw
    # on the GPU machine (prints and saves the per-config table):
    python bench/gpu_ravdess.py run --audio DIR --weights .devw --sha256 whisper-base=HEX ... \\
        --configs whisper-base:infra/configs/ravdess-whisper-base.toml ... --speed-perturb 0.9,1.1 --out OUT

A config's ``[data]`` table applies as in ``msata train``; with ``--speed-perturb 0.9,1.1`` every
recording also gets its speed-perturbed copies (``features.speed.speed_perturb``, the store's
``<clip_id>_sp<factor>`` ids), and a config with ``[data] speed_copies = true`` trains on them
(training speakers only, as ``msata train``). ``train.probe_weight`` fits and mixes the pooled
probe with ``modeling.training.fold_run.attach_pooled_probe``, the function ``msata train`` uses;
a fold's validation figure is then that of the mixture, the model's own beside it (``msata
train``'s own tables print the model's, ``best_val_uar``; its registered fold and registry figures use the mixture's).

``train.members = N`` trains the fold's seed ensemble with ``modeling.training.members.train_members`` (members one
after another, as ``msata train``); with ``--parallel-members`` each member is a fold job of its own (seed + k, what
member k trains) and a second pass writes and scores each fold's ensemble as ``train_members`` does.

``export-weights`` writes each packaged encoder's ``encoder/*`` tensors to ``NAME.npz``
(numpy, ``allow_pickle=False`` on read) and prints its sha256; ``run`` refuses a file
whose sha256 differs from the one given on the command line.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOG_MEL = "log-mel"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_weights(out: Path) -> None:
    from features.audio_encoders.registry import PACKAGED_ENCODERS
    from features.audio_encoders.weights import load_encoder_tensors

    out.mkdir(parents=True, exist_ok=True)
    for name, spec in PACKAGED_ENCODERS.items():
        tensors = {k: v for k, v in load_encoder_tensors(spec).items() if k.startswith("encoder/")}
        path = out / f"{name}.npz"
        np.savez(path, **{k.replace("/", "|"): np.asarray(v) for k, v in tensors.items()})
        print(f"{name}={sha256_of(path)}  {path} ({path.stat().st_size / 1e6:.1f} MB)")


def load_encoder(weights_dir: Path, name: str, expected_sha256: str):
    from features.audio_encoders.whisper import WhisperEncoder

    path = weights_dir / f"{name}.npz"
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise SystemExit(f"{path}: sha256 {actual} is not the expected {expected_sha256}")
    with np.load(path, allow_pickle=False) as archive:
        tensors = {k.replace("|", "/"): archive[k] for k in archive.files}
    return WhisperEncoder.from_ct2(tensors)


# ---------------------------------------------------------------- features, once per representation


@dataclass(frozen=True)
class Clip:
    clip_id: str
    speaker: str
    label: str
    path: str


def ravdess_clips(root: Path) -> list[Clip]:
    from features.recipes.ravdess import prepare_ravdess

    result = prepare_ravdess(root)
    if result.rejected:
        print(f"{len(result.rejected)} files rejected by the RAVDESS recipe, e.g. {result.rejected[0]}")
    return [Clip(r.clip_id, r.speaker, r.label, str(r.audio_path)) for r in result.records]


def read_waves(clips: list[Clip]) -> list[np.ndarray]:
    import soundfile

    waves = []
    for clip in clips:
        wave, rate = soundfile.read(clip.path, dtype="float32", always_2d=True)
        if rate != 16_000:
            raise SystemExit(f"{clip.path}: {rate} Hz; this bench reads the 16 kHz development copy")
        waves.append(wave.mean(axis=1))
    return waves


def save_representation(directory: Path, arrays: list[np.ndarray], times: list[np.ndarray], clips: list[Clip]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(a) for a in arrays])
    np.save(directory / "frames.npy", np.concatenate(arrays))
    np.save(directory / "times.npy", np.concatenate(times))
    np.save(directory / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    (directory / "clips.json").write_text(json.dumps([c.clip_id for c in clips]))


def extract_encoder(encoder, name: str, waves: list[np.ndarray], device: str) -> tuple[list[np.ndarray], dict, list[np.ndarray]]:
    """States of every clip in fp32, by the function ``msata preprocess`` uses
    (``stage.encode_whisper``), timed; on CUDA, bf16 autocast timed on the same clips and
    compared with fp32 (the reason msata extracts in fp32)."""
    import torch

    from features.audio_encoders.stage import encode_whisper
    from features.audio_encoders.whisper import whisper_log_mel
    from features.config import AudioEncoderConfig

    config = AudioEncoderConfig(name=name)
    layers, torch_device = list(config.state_indices()), torch.device(device)
    encoder = encoder.to(device).eval()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run_bf16(wave: np.ndarray) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            states = encoder(whisper_log_mel(torch.from_numpy(wave).to(device))[None])
            return torch.stack([states[i][0] for i in layers], dim=1).float()  # (T, L, D)

    for wave in waves[:8]:  # warm-up (kernels, allocator)
        encode_whisper(encoder, wave, config, layers, torch_device), cuda and run_bf16(wave)
    sync()
    t0 = time.perf_counter()
    pairs = [encode_whisper(encoder, wave, config, layers, torch_device) for wave in waves]
    sync()
    fp32_s = time.perf_counter() - t0
    out, times = [p[0] for p in pairs], [p[1] for p in pairs]
    audio_s = sum(len(w) for w in waves) / 16_000
    stats = {"clips": len(waves), "audio_s": audio_s, "fp32_s": fp32_s, "fp32_x_realtime": audio_s / fp32_s}
    if not cuda:  # bf16 only pays on a GPU
        return out, stats, times
    t0, worst = time.perf_counter(), 0.0
    for i, wave in enumerate(waves):
        states = run_bf16(wave)
        if i % 50 == 0:  # accuracy of bf16 against fp32, on a sample of clips
            reference = torch.from_numpy(out[i]).to(device).float()
            worst = max(worst, float(((states - reference).abs().max() / reference.abs().max()).item()))
    sync()
    bf16_s = time.perf_counter() - t0
    stats |= {"bf16_s": bf16_s, "bf16_x_realtime": audio_s / bf16_s, "bf16_max_rel_err": worst}
    return out, stats, times


# ---------------------------------------------------------------- one fold of one config (a worker process)


class MemoryStore:
    """What ClipDataset reads from a FeatureStore (``read(clip_id)``), over the .npy files."""

    def __init__(self, directory: Path, is_log_mel: bool) -> None:
        self.frames = np.load(directory / "frames.npy", mmap_mode="r")
        self.times = np.load(directory / "times.npy", mmap_mode="r")
        offsets = np.load(directory / "offsets.npy")
        ids = json.loads((directory / "clips.json").read_text())
        self.span = {cid: (int(offsets[i]), int(offsets[i + 1])) for i, cid in enumerate(ids)}
        self.is_log_mel = is_log_mel

    def read(self, clip_id: str, skip: object = None):  # skip: arrays a FeatureStore may leave unread; all are read here
        from features.clip import ClipFeatures

        a, b = self.span[clip_id]
        frames, times = np.asarray(self.frames[a:b]), np.asarray(self.times[a:b])
        duration = float(times[-1] + 0.02) if len(times) else 0.0
        if self.is_log_mel:
            return ClipFeatures(clip_id, duration, logmel=frames, audio_times=times)
        return ClipFeatures(clip_id, duration, audio_states=frames, audio_times=times)


def run_fold(job: dict) -> dict:
    """One fold of one config, in its own process: train with model choice on validation, then the
    refit and the pooled probe when the config asks for them, as ``fold_run.train_and_test_fold``
    does; returns the fold's row of ``folds.jsonl``."""
    import torch

    torch.set_num_threads(1)
    from dataclasses import replace
    from types import SimpleNamespace

    from features.config import AudioEncoderConfig, FeatureConfig
    from modeling.data.dataset import ClipDataset, make_loader
    from modeling.data.splits import fold_from_dict, ids_with_copies
    from modeling.network.encoder import MsataConfig, MsataModel
    from modeling.training.checkpoint import load_trained_model
    from modeling.training.distributed import SINGLE
    from modeling.training.experiment_spec import build_model_config, make_data_config
    from modeling.training.fold_run import attach_pooled_probe
    from modeling.training.members import ENSEMBLE_FILE, train_members
    from modeling.training.metrics import compute_metrics
    from modeling.training.train_loop import TrainConfig, predict, seed_everything, train_model

    encoder = job["encoder"]
    feature_config = FeatureConfig() if encoder == LOG_MEL else FeatureConfig(audio_encoder=AudioEncoderConfig(name=encoder))
    config = TrainConfig.from_dict({**job["train"], "device": job["device"], "num_workers": 0})
    data_config = make_data_config(config, job["data"])  # [train]'s shared fields, [data]'s augmentation
    copies = {k: tuple(v) for k, v in job["copies"].items()} if data_config.speed_copies else {}
    fold = fold_from_dict(job["fold"])
    labels = job["labels"]
    store = MemoryStore(Path(job["features"]), encoder == LOG_MEL)

    def loader(ids, train, workers=0, with_copies=None, cache=True):
        # the signature of fold_run.loaders' make_loader: copies join training clips only (or the probe's fit);
        # `workers` is ignored, every fold reads its own batches (module docstring)
        if train if with_copies is None else with_copies:
            ids = ids_with_copies(tuple(ids), copies)
        ds = ClipDataset(
            "memory",
            ids,
            [labels.index(job["label_of"][c]) for c in ids],
            feature_config,
            data_config if cache else replace(data_config, in_memory=False),
            train,
            [job["speaker_of"][c] for c in ids],
            reader=store,  # the memory-mapped features instead of a Zarr store
        )
        return make_loader(ds, config.batch_size, 0, config.seed, pin_memory=job["device"] == "cuda")

    @functools.cache  # a model is tested once, however many of the steps below ask for its figures
    def test(path: Path):
        model, _, _ = load_trained_model(path, job["device"])
        y, probs, _, _ = predict(model, loader(fold.test_ids, False), torch.device(job["device"]))
        return compute_metrics(y, probs.argmax(axis=1), len(labels))

    model_config = build_model_config(job["model"], feature_config, len(labels))

    def initial_model(settings: TrainConfig = config) -> MsataModel:
        seed_everything(settings.seed)
        model = MsataModel(MsataConfig.from_dict(model_config))
        if model.config.audio_finetune_blocks:
            model.audio_frontend.load_top_blocks(load_encoder(Path(job["weights"]), encoder, job["sha256"][encoder]))
        return model

    meta = {
        "model_config": model_config,
        "feature_config": feature_config.to_dict(),
        "label_names": labels,
        "dataset": "ravdess",
        "modalities": ["audio"],
    }
    t0 = time.perf_counter()
    train_loader, val_loader = loader(fold.train_ids, True), loader(fold.val_ids, False)
    if job.get("member_rows"):  # --parallel-members: the members trained as jobs of their own; assemble them
        result, record = combine_members(
            job["member_rows"], config, Path(job["run_dir"]), val_loader, torch.device(job["device"]), len(labels)
        )
    else:
        result = train_model(initial_model(), train_loader, val_loader, config, Path(job["run_dir"]), meta, resume=False)
    train_s = time.perf_counter() - t0 + sum(r["train_s"] for r in job.get("member_rows", []))  # an ensemble's: its members' too
    metrics = test(result.best_path)
    tested_path, refit, members = result.best_path, {}, {}
    if job.get("member_rows"):
        tested_path = Path(job["run_dir"]) / ENSEMBLE_FILE
        members = {"members": record | {"test_first_member": metrics.scalars()}, "members_s": sum(record["member_train_s"][1:])}
    elif config.members > 1:  # as msata train does: members 1.. on the same loaders, the fold ships their mean
        t1 = time.perf_counter()
        tested_path, record = train_members(
            result, initial_model, train_loader, val_loader, config, Path(job["run_dir"]), meta, torch.device(job["device"]), resume=False
        )
        members = {"members": record | {"test_first_member": metrics.scalars()}, "members_s": time.perf_counter() - t1}
    if config.refit:  # as msata train does: the same recipe on training + validation actors, up to the chosen epoch
        t1 = time.perf_counter()
        refit_result = train_model(
            initial_model(),
            loader(fold.train_ids + fold.val_ids, True),
            None,
            config,
            Path(job["run_dir"]) / "refit",
            meta,
            resume=False,
            stop_after_epoch=result.best_epoch,
        )
        tested_path = refit_result.best_path
        refit = {"refit_test": test(tested_path).scalars(), "refit_s": time.perf_counter() - t1}
    own_val = members["members"]["val_uar_ensemble"] if members else result.best_val_uar  # without a probe: what ships
    probe: dict = {}
    if config.probe_weight > 0:  # as msata train does: the pooled probe fitted and mixed into the tested model
        t1 = time.perf_counter()
        spec = SimpleNamespace(train=config, label_names=labels)  # the two fields attach_pooled_probe reads
        tested_path, record = attach_pooled_probe(
            spec, fold, loader, tested_path, Path(job["run_dir"]), test, torch.device(job["device"]), SINGLE
        )
        probe = {"probe": record, "probe_s": time.perf_counter() - t1}
    return {
        "config": job["config"],
        "fold": fold.index,
        "test": test(tested_path).scalars(),  # what msata train reports for the fold
        "selection_test": metrics.scalars(),  # the first model chosen on validation: before any refit, other members or probe
        **refit,
        **members,
        **probe,
        "best_val_uar": result.best_val_uar,
        # the validation UAR of what the fold ships (the mixture, with a probe): FoldResult.shipped_val_uar
        "shipped_val_uar": probe["probe"].get("val_uar_mixed", own_val) if probe else own_val,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_path": str(result.best_path),
        "member": job.get("member"),  # --parallel-members: which member of its config this job trained
        "train_s": train_s,
        # an assembled ensemble has no epochs of its own: its members' training passes
        "train_clips_per_s": float(
            np.mean([h.train_clips_per_s for h in result.history] or [r["train_clips_per_s"] for r in job["member_rows"]])
        ),
        "data_wait_share": float(
            np.mean([h.data_wait_share for h in result.history] or [r["data_wait_share"] for r in job["member_rows"]])
        ),
        "test_speakers": list(fold.test_speakers),
        "val_speakers": list(fold.val_speakers),
    }


def combine_members(member_rows: list[dict], config, run_dir: Path, val_loader, device, n_classes: int) -> tuple:
    """``--parallel-members``: the seed ensemble of ``train.members`` from its members' own fold jobs (member k:
    the recipe with seed + k, what ``train_members`` trains as member k; tests/modeling/training/test_members.py),
    written and scored by ``assemble_members`` as ``train_members`` does; returns member 0's TrainResult and the record."""
    from modeling.training.members import assemble_members
    from modeling.training.train_loop import TrainResult

    rows = sorted(member_rows, key=lambda r: r["member"])
    if [r["member"] for r in rows] != list(range(config.members)):
        raise SystemExit(f"{run_dir}: members {[r['member'] for r in rows]} for train.members = {config.members}")
    results = [TrainResult(r["best_epoch"], r["best_val_uar"], r["epochs_run"], False, [], Path(r["best_path"])) for r in rows]
    _, record = assemble_members(results, config, run_dir, val_loader, device, n_classes)
    return results[0], record | {"member_train_s": [r["train_s"] for r in rows]}


# ---------------------------------------------------------------- driver


def summarise(rows: list[dict]) -> list[dict]:
    """Per config: means over folds, and test metrics as (mean, sample std) like ``msata train``'s
    summary (``mean_std``, ddof=1). Until session 10 this printed the population std (np.std),
    sqrt(4/5) of it for 5 folds: the H200 tables of sessions 4-5 in docs/results.md say so."""
    from modeling.training.metrics import mean_std

    table = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["fold"])
        entry = {
            "config": name,
            "folds": len(mine),
            # what the folds ship (the mixture, with a probe; rows of older runs have only the model's)
            "val_uar": float(np.mean([r.get("shipped_val_uar", r["best_val_uar"]) for r in mine])),
            "val_uar_model": float(np.mean([r["best_val_uar"] for r in mine])),
            "train_s_per_fold": float(np.mean([r["train_s"] for r in mine])),
            "train_clips_per_s": float(np.mean([r["train_clips_per_s"] for r in mine])),
            "data_wait_share": float(np.mean([r["data_wait_share"] for r in mine])),
        }
        for metric in ("wa", "uar", "macro_f1"):
            values = [r["test"][metric] for r in mine]
            entry[metric] = mean_std(values)
        before = [r.get("selection_test", r["test"])["uar"] for r in mine]  # rows of older runs have no refit
        entry["selection_uar"] = mean_std(before)
        if all("probe" in r for r in mine):  # the tested model without its probe (reported beside, chooses nothing)
            entry["model_alone_uar"] = mean_std([r["probe"]["test_model"]["uar"] for r in mine])
        table.append(entry)
    return table


def run(args: argparse.Namespace) -> None:
    import torch

    from features.recipes.ravdess import RAVDESS_LABELS
    from features.speed import copy_clip_id, parse_speed_factors, speed_perturb
    from modeling.data.splits import SplitConfig, fold_to_dict, make_folds
    from modeling.training.train_loop import TrainConfig

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = dict(item.split("=", 1) for item in args.sha256)
    configs, encoder_of = {}, {}
    for item in args.configs:
        encoder, _, path = item.rpartition(":")
        configs[Path(path).stem] = tomllib.loads(Path(path).read_text())
        encoder_of[Path(path).stem] = encoder or LOG_MEL
    clips = ravdess_clips(Path(args.audio))
    if args.actors:
        clips = [c for c in clips if c.speaker in set(args.actors.split(","))]
    t0 = time.perf_counter()
    waves = read_waves(clips)
    print(
        f"{len(clips)} clips read in {time.perf_counter() - t0:.1f} s on {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'})",
        flush=True,
    )

    factors = parse_speed_factors(args.speed_perturb)
    recordings = list(clips)
    copies: dict[str, list[str]] = {}
    if factors:  # each recording's copies, as msata preprocess --speed-perturb names them
        t0, recording_waves = time.perf_counter(), list(waves)
        for factor in factors:
            for clip, wave in zip(recordings, recording_waves, strict=True):
                copy = Clip(copy_clip_id(clip.clip_id, factor), clip.speaker, clip.label, clip.path)
                clips.append(copy)
                waves.append(speed_perturb(wave, factor))
                copies.setdefault(clip.clip_id, []).append(copy.clip_id)
        print(f"{len(clips) - len(recordings)} speed copies ({args.speed_perturb}) made in {time.perf_counter() - t0:.1f} s", flush=True)

    encoders = set(encoder_of.values())
    saved_stats = out / "extraction.json"  # a rerun with --reuse-features keeps the figures it did not remeasure
    extraction = json.loads(saved_stats.read_text()) if saved_stats.exists() else {}
    for encoder in sorted(encoders):
        t0 = time.perf_counter()
        saved = work / encoder / "clips.json"
        if args.reuse_features and saved.exists() and json.loads(saved.read_text()) == [c.clip_id for c in clips]:
            print(f"features {encoder}: reused from {saved.parent}", flush=True)
            continue
        if encoder == LOG_MEL:
            from features.audio import log_mel
            from features.config import AudioConfig

            pairs = [log_mel(w, AudioConfig()) for w in waves]
            arrays, times = [p[0] for p in pairs], [p[1] for p in pairs]
            extraction[encoder] = {"cpu_s": time.perf_counter() - t0}
        else:
            model = load_encoder(Path(args.weights), encoder, expected[encoder])
            arrays, extraction[encoder], times = extract_encoder(model, encoder, waves, device)
        save_representation(work / encoder, arrays, times, clips)
        print(f"features {encoder}: {json.dumps(extraction[encoder])}", flush=True)
    saved_stats.write_text(json.dumps(extraction, indent=1))

    import pandas as pd

    everything = pd.DataFrame([{"clip_id": c.clip_id, "speaker": c.speaker, "label": c.label} for c in clips])
    manifest = everything.iloc[: len(recordings)]  # folds are made of recordings; copies only join training parts
    jobs, member_jobs = [], []
    label_of = dict(zip(everything.clip_id, everything.label, strict=True))
    speaker_of = dict(zip(everything.clip_id, everything.speaker, strict=True))
    for name, cfg in configs.items():
        train = dict(cfg.get("train", {}))
        if cfg.get("data", {}).get("speed_copies") and not copies:
            raise SystemExit(f"{name}: [data] speed_copies = true needs --speed-perturb (the store's copies)")
        if args.epochs:
            train["epochs"] = args.epochs
        TrainConfig.from_dict(train)  # refused here (e.g. members with refit), before any fold job runs
        folds = make_folds(manifest, SplitConfig(**{"n_folds": args.folds, **cfg.get("splits", {})}))
        encoder = encoder_of[name]
        own_seed = int(train.get("seed", 0))
        for seed, fold in ((seed, fold) for seed in (args.seeds or [own_seed]) for fold in folds):
            # another training seed (initial weights, batch order, augmentation) on the same folds
            row_name = name if seed == own_seed else f"{name}@seed{seed}"
            job = {
                "config": row_name,
                "encoder": encoder,
                "train": train | {"seed": seed},
                "data": cfg.get("data", {}),
                "copies": copies,
                "model": cfg.get("model", {}),
                "fold": fold_to_dict(fold),
                "labels": list(RAVDESS_LABELS),
                "label_of": label_of,
                "speaker_of": speaker_of,
                "features": str(work / encoder),
                "weights": args.weights,
                "sha256": expected,
                "device": device,
                "run_dir": str(work / "runs" / row_name / f"fold_{fold.index}"),
            }
            jobs.append(job)
            n_members = int(train.get("members", 1))
            if args.parallel_members and n_members > 1:  # member k: its own job, assembled in the second pass
                member_jobs += [
                    job
                    | {
                        "config": f"{row_name}#member{k}",
                        "train": train | {"seed": seed + k, "members": 1, "probe_weight": 0.0},  # the probe: on the ensemble
                        "run_dir": str(Path(job["run_dir"]) / f"member{k}"),
                        "member": k,
                        "ensemble": (row_name, fold.index),
                    }
                    for k in range(n_members)
                ]
    rows: list[dict] = []
    t0 = time.perf_counter()
    if member_jobs:  # --parallel-members: first every member of every fold, then each fold's ensemble
        member_rows = run_jobs(member_jobs, args.jobs, out)
        rows += member_rows
        for job in jobs:
            mine = [r for r, j in zip(member_rows, member_jobs, strict=True) if j["ensemble"] == (job["config"], job["fold"]["index"])]
            if mine:
                job["member_rows"] = mine
    rows += run_jobs(jobs, args.jobs, out)
    rows.sort(key=lambda r: (list(configs).index(re.split("[@#]", r["config"])[0]), r["config"], r["fold"]))
    table = summarise(rows)
    (out / "summary.json").write_text(json.dumps({"device": device, "wall_s": time.perf_counter() - t0, "table": table}, indent=1))
    print(f"\n{len(jobs) + len(member_jobs)} fold runs in {time.perf_counter() - t0:.0f} s on {device}")
    print(
        f"{'config':36s} {'val UAR':>8s} {'(model)':>8s} {'WA':>13s} {'UAR':>13s} {'macro-F1':>13s} {'first model':>16s} "
        f"{'model alone':>13s} {'s/fold':>7s} {'clips/s':>8s} {'wait':>5s}"
    )
    for e in table:
        cells = " ".join(f"{e[m][0]:.3f} ± {e[m][1]:.3f}" for m in ("wa", "uar", "macro_f1"))
        alone = f"{e['model_alone_uar'][0]:.3f} ± {e['model_alone_uar'][1]:.3f}" if "model_alone_uar" in e else "-"
        print(
            f"{e['config']:36s} {e['val_uar']:8.3f} {e['val_uar_model']:8.3f} {cells} {e['selection_uar'][0]:.3f} ± {e['selection_uar'][1]:.3f} "
            f"{alone:>13s} {e['train_s_per_fold']:7.0f} {e['train_clips_per_s']:8.0f} {e['data_wait_share']:5.2f}"
        )


def run_jobs(jobs: list[dict], n_processes: int, out: Path) -> list[dict]:
    """Run fold jobs in parallel processes; each row is appended to ``out/folds.jsonl`` as its fold ends.
    Returns the rows in the order of ``jobs``."""
    import multiprocessing

    rows: list[dict | None] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=min(n_processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_fold, job): i for i, job in enumerate(jobs)}
        for done in as_completed(futures):  # saved as each fold ends
            row = done.result()
            rows[futures[done]] = row
            with open(out / "folds.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            alone = f", the model alone {row['probe']['test_model']['uar']:.3f}" if "probe" in row else ""
            print(
                f"{row['config']} fold {row['fold']}: val UAR {row['shipped_val_uar']:.3f} (the model {row['best_val_uar']:.3f}) "
                f"test UAR {row['test']['uar']:.3f} (the first model, before any refit, members or probe {row['selection_test']['uar']:.3f}{alone}) "
                f"({row['train_s']:.0f} s, {row['epochs_run']} epochs)",
                flush=True,
            )
    return [r for r in rows if r is not None]


def markdown(folds_jsonl: Path) -> str:
    """docs/results.md's tables from a run's folds.jsonl: one row per fold, then mean ± std."""
    rows = [json.loads(line) for line in folds_jsonl.read_text().splitlines() if line.strip()]
    lines = []
    for entry in summarise(rows):
        name = entry["config"]
        lines += [
            f"`{name}`",
            "",
            "| fold | test actors | val actors | best epoch / run | val UAR (as shipped) | test WA | test UAR | test macro-F1 |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in sorted((r for r in rows if r["config"] == name), key=lambda r: r["fold"]):
            t = r["test"]
            lines.append(
                f"| {r['fold']} | {' '.join(r['test_speakers'])} | {' '.join(r['val_speakers'])} | {r['best_epoch']} / {r['epochs_run']} "
                f"| {r.get('shipped_val_uar', r['best_val_uar']):.3f} | {t['wa']:.3f} | {t['uar']:.3f} | {t['macro_f1']:.3f} |"
            )
        cells = " | ".join(f"**{entry[m][0]:.3f} ± {entry[m][1]:.3f}**" for m in ("wa", "uar", "macro_f1"))
        lines += [f"| **mean ± std** | | | | {entry['val_uar']:.3f} | {cells} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-weights", help="write the packaged encoders' tensors to NAME.npz and print their sha256")
    export.add_argument("--out", required=True)
    go = sub.add_parser("run", help="extract features and cross-validate each config")
    go.add_argument("--audio", required=True, help="RAVDESS root (Actor_XX/ folders of 16 kHz audio)")
    go.add_argument("--weights", default="", help="folder of NAME.npz written by export-weights")
    go.add_argument("--sha256", nargs="*", default=[], help="NAME=HEX for every encoder a config uses")
    go.add_argument(
        "--configs",
        nargs="+",
        required=True,
        help="ENCODER:CONFIG.toml (a run config as for msata train, on the features of that audio encoder); CONFIG.toml alone = log-mel",
    )
    go.add_argument("--out", required=True)
    go.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/msata-gpu-ravdess")
    go.add_argument("--folds", type=int, default=5)
    go.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="fold runs in parallel")
    go.add_argument("--actors", default="", help="comma-separated subset of actors (smoke runs)")
    go.add_argument("--epochs", type=int, default=0, help="override every config's epochs (smoke runs)")
    go.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="training seeds, e.g. 0,1: each config once per seed (default: the config's own)",
    )
    go.add_argument(
        "--parallel-members",
        action="store_true",
        help="a config with train.members = N trains each member as a fold job of its own (seed + k), then assembles each fold's "
        "ensemble as train.members does (default: members one after another in the fold's job, as msata train)",
    )
    go.add_argument("--reuse-features", action="store_true", help="keep features already in --work for the same clips")
    go.add_argument("--speed-perturb", default="", help="speed factors of the recordings' copies, e.g. 0.9,1.1 (for [data] speed_copies)")
    table = sub.add_parser("table", help="print a run's per-fold markdown tables (from OUT/folds.jsonl)")
    table.add_argument("folds_jsonl")
    args = parser.parse_args()
    if args.command == "export-weights":
        export_weights(Path(args.out))
    elif args.command == "table":
        print(markdown(Path(args.folds_jsonl)))
    else:
        run(args)


if __name__ == "__main__":
    main()
