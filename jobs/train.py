"""Train RSHNL with Ray Train on a feature-store dataset, log to MLflow and register the model.

Works directly and as ``ray job submit -- python -m jobs.train ...``. Config precedence:
defaults < --config YAML < flags.
"""

from __future__ import annotations

import argparse
import logging

from jobs._cli import EXIT_OK, run_main, setup_logging, write_json_atomic
from pipeline.config import TrainConfig

log = logging.getLogger("jobs.train")

# flag → (config key, type)
_FLAGS: dict[str, tuple[str, type]] = {
    "--dataset": ("dataset", str),
    "--method": ("method", str),
    "--bits": ("bits", int),
    "--epochs": ("epochs", int),
    "--workers": ("workers", int),
    "--seed": ("seed", int),
    "--gamma": ("gamma", float),
    "--alpha": ("alpha", float),
    "--r": ("r", float),
    "--tau": ("tau", float),
    "--warmup-epochs": ("warmup_epochs", int),
    "--batch-size": ("batch_size", int),
    "--lr": ("lr", float),
    "--hidden-dim": ("hidden_dim", int),
    "--feature-norm": ("feature_norm", str),
    "--cpus-per-worker": ("cpus_per_worker", float),
    "--max-failures": ("max_failures", int),
    "--checkpoint-every": ("checkpoint_every", int),
    "--checkpoint-interval-s": ("checkpoint_interval_s", float),
    "--storage-path": ("storage_path", str),
    "--experiment-name": ("experiment_name", str),
    "--run-name": ("run_name", str),
    "--tracking-uri": ("tracking_uri", str),
    "--registered-model-name": ("registered_model_name", str),
    "--center-sync-check-every": ("center_sync_check_every", int),
    "--centers": ("centers", str),
    "--global-negatives": ("global_negatives", str),
    "--shuffle-buffer": ("shuffle_buffer", int),
    "--placement-strategy": ("placement_strategy", str),
    "--weighting": ("weighting", str),
    "--loss-form": ("loss_form", str),
    "--weight-decay": ("weight_decay", float),
    "--eval-top-k": ("eval_top_k", int),
    "--scbch-alpha": ("scbch_alpha", float),
    "--scbch-beta": ("scbch_beta", float),
    "--scbch-k": ("scbch_k", int),
    "--scbch-g": ("scbch_g", float),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    p.add_argument("--config", help="YAML file with TrainConfig keys")
    for flag, (key, typ) in _FLAGS.items():
        p.add_argument(
            flag,
            dest=key,
            type=typ,
            default=None,
            help=f"config '{key}' (default {getattr(TrainConfig(), key)!r})",
        )
    p.add_argument(
        "--use-gpu",
        dest="use_gpu",
        action="store_true",
        default=None,
        help="one GPU per worker, NCCL backend",
    )
    p.add_argument(
        "--bf16",
        dest="bf16",
        action="store_true",
        default=None,
        help="autocast the MLPs to bfloat16 (losses stay fp32)",
    )
    p.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=None,
        help=(
            "continue --run-name from its newest intact checkpoint in --storage-path; the data "
            "and every key that shapes the model or objective must match its first start, only "
            "--epochs, execution, location and registration settings may change"
        ),
    )
    p.add_argument(
        "--no-register",
        dest="register_model",
        action="store_false",
        default=None,
        help="log the model but do not register it",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (else $RAY_ADDRESS)")
    p.add_argument("--summary-json", help="write the run summary here (JSON)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    keys = [k for k, _ in _FLAGS.values()] + ["use_gpu", "bf16", "resume", "register_model"]
    cfg = TrainConfig.load(args.config, {k: getattr(args, k) for k in keys})
    from pipeline.training.trainer import run_training

    summary = run_training(cfg, ray_address=args.ray_address)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    reg = summary.get("registered_model") or {}
    log.info(
        "done: test MAP %.4f (i2t %.4f, t2i %.4f) at best epoch %d; MLflow run %s at %s; "
        "registered model %s version %s",
        summary["test_map"]["mean"],
        summary["test_map"]["i2t"],
        summary["test_map"]["t2i"],
        summary["best_epoch"],
        summary["mlflow_run_id"],
        summary["tracking_uri"],
        reg.get("name"),
        reg.get("version"),
    )
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
