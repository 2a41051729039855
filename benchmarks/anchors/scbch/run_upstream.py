"""Run the authors' SCBCH code (github.com/Plke/SCBCH) unchanged on CPU on exported MIRFlickr data.

``--upstream`` is a checkout of that repository; ``--workdir`` is a directory written by
``export.py`` (``data/MIRFlickr.h5``, ``noise_label/mirflickr25k-lall-noise_<rate>.h5``). The
upstream ``train.py`` is imported as a module (its argparse reads the flags set here) and one cell
of its ``__main__`` loop is run: the ``flickr`` settings of that loop (n_class 24, tag_len 1386,
k 20, margin 0.15, shift 0.8), ``setup_seed(seed)``, ``get_config()``, ``train(config, bit, seed,
0)``. What this adapter changes, and nothing else:

* device: ``config["device"]`` is the CPU (upstream: ``cuda:<gpus>``);
* imports that the CPU path does not use are stubbed when absent: ``torchvision`` (only
  ``transforms.ToTensor()`` is constructed, and never applied; ``models`` is never used) and
  ``tqdm`` (progress bars: the identity);
* ``pr_curve`` (15 precision-recall points per direction each epoch, only pickled to ``PR/``)
  returns empty lists: it costs minutes per epoch on CPU and feeds neither training nor MAP;
* ``config["epoch"]`` (upstream 50) is ``--epochs`` + 1 when given, and the run stops right after
  the evaluation that opens epoch ``--epochs`` + 1: upstream evaluates at the start of every epoch,
  so this evaluates the models after 0, 1, ..., ``--epochs`` epochs of training;
* ``calc_map_k`` and ``select_clean_sample`` are wrapped to record their results: upstream's MAP
  (its ``calc_map_k`` over the whole database, i.e. MAP@all) and, on the same codes, the project's
  MAP and MAP@k (``pipeline.retrieval.metrics``, ties by database index; MAP@k divides by
  min(R, k)), upstream's own ``calc_map_k(k=top_k)`` (the first min(R, k) relevant items) and
  the MAP@k convention of upstream's ``CalcTopMap`` (``topk.top_map_hits``: divides by the
  relevant items found in the top k); the reliability weights of every epoch (their ROC AUC
  against the noisy rows of the noise file).

Alpha and beta default to the README's ``python ./train.py --gpus=0 --alpha=0.7 --beta=0.3``
(upstream's argparse defaults are the reverse, 0.3 / 0.7).

    python benchmarks/anchors/scbch/run_upstream.py --upstream /tmp/scbch --workdir WORKDIR \\
        --bits 32 --noise-rate 0.5 --seed 0 --epochs 10 --threads 1 --out result.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("run_upstream")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLICKR = {"n_class": 24, "tag_len": 1386, "k": 20, "margin": 0.15, "shift": 0.8}


class StopAfterEvaluationError(Exception):
    """Raised after the last wanted evaluation, before upstream trains another epoch."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--upstream", required=True, help="checkout of github.com/Plke/SCBCH")
    p.add_argument("--workdir", required=True, help="directory written by export.py")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--noise-rate", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="0: upstream's 50 (no extra evaluation)")
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="result JSON path")
    return p.parse_args(argv)


def _stub(name: str) -> types.ModuleType:
    """An empty module with a spec (torch's import machinery inspects ``__spec__``)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = mod
    return mod


def _stub_missing() -> None:
    """torchvision and tqdm stand-ins, only where the real packages are not installed."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = _stub("torchvision")
        transforms = _stub("torchvision.transforms")
        transforms.ToTensor = lambda: None  # constructed by get_data, never applied
        tv.transforms, tv.datasets, tv.models = (
            transforms,
            _stub("torchvision.datasets"),
            _stub("torchvision.models"),
        )
    try:
        import tqdm  # noqa: F401
    except ImportError:
        tq = _stub("tqdm")
        tq.tqdm = lambda it, *a, **k: it
        sys.modules["tqdm"] = tq


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One upstream cell; returns the per-epoch record."""
    import torch

    from pipeline.retrieval.metrics import mean_average_precision, roc_auc

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from topk import top_map_hits

    torch.set_num_threads(args.threads)
    _stub_missing()
    upstream = str(Path(args.upstream).resolve())
    workdir = Path(args.workdir).resolve()
    with h5py_file(workdir / "noise_label" / f"mirflickr25k-lall-noise_{args.noise_rate}.h5") as f:
        is_noisy = (np.asarray(f["result"]) != np.asarray(f["True"])).any(axis=1)
    os.chdir(workdir)
    sys.path.insert(0, upstream)
    sys.argv = [
        os.path.join(upstream, "train.py"),
        f"--hash_dim={args.bits}",
        f"--noise_rate={args.noise_rate}",
        f"--alpha={args.alpha}",
        f"--beta={args.beta}",
    ]
    up = importlib.import_module("train")  # upstream train.py: argparse and definitions only

    evals: list[dict[str, float]] = []
    weights_auc: list[dict[str, float]] = []
    pending: dict[str, float] = {}
    wanted = args.epochs + 1 if args.epochs else None
    t_start = time.perf_counter()
    orig_map = up.calc_map_k

    def calc_map_k(rB, qB, retrieval_label, query_label, k=None, device=None):
        value = orig_map(rB, qB, retrieval_label, query_label, k=k, device=device)
        direction = "t2i" if "t2i" not in pending else "i2t"  # upstream: t2i first, then i2t
        pending[direction] = float(value)
        pending[f"{direction}_project"] = mean_average_precision(
            qB, rB, query_label, retrieval_label
        )
        pending[f"{direction}_at_k_project"] = mean_average_precision(
            qB, rB, query_label, retrieval_label, top_k=args.top_k
        )
        pending[f"{direction}_at_k_hits"] = top_map_hits(
            qB, rB, query_label, retrieval_label, args.top_k
        )
        pending[f"{direction}_first_k"] = float(
            orig_map(rB, qB, retrieval_label, query_label, k=args.top_k, device=device)
        )
        if direction == "i2t":
            rec = dict(pending, epochs_trained=len(evals), seconds=time.perf_counter() - t_start)
            evals.append(rec)
            pending.clear()
            log.info("evaluation after %d epochs: %s", rec["epochs_trained"], rec)
            if wanted is not None and len(evals) >= wanted:
                raise StopAfterEvaluationError
        return value

    orig_select = up.select_clean_sample

    def select_clean_sample(*a, **k):
        w = orig_select(*a, **k)
        wn = w.detach().cpu().numpy()
        rec = {
            "epoch_index": len(evals) - 1,
            "auc_neg_weight": roc_auc(-wn, is_noisy),
            "clean_mean_weight": float(wn[~is_noisy].mean()),
            "noisy_mean_weight": float(wn[is_noisy].mean()),
        }
        weights_auc.append(rec)
        log.info("reliability weights: %s", rec)
        return w

    up.calc_map_k = calc_map_k
    up.select_clean_sample = select_clean_sample
    up.pr_curve = lambda *a, **k: ([], [])

    # one cell of upstream's __main__ loop, dataset "flickr"
    up.setup_seed(args.seed)
    up.bit_len = args.bits
    up.noise_rate = args.noise_rate
    up.dataset = "flickr"
    for key, value in FLICKR.items():
        setattr(up, key, value)
    config = up.get_config()
    config["device"] = torch.device("cpu")
    if wanted is not None:
        config["epoch"] = wanted
    log.info("upstream config: %s", config)
    try:
        up.train(config, args.bits, args.seed, 0)
    except StopAfterEvaluationError:
        pass
    wall = time.perf_counter() - t_start
    best = max(evals, key=lambda r: r["t2i"] + r["i2t"])  # upstream's own choice (on the test)
    return {
        "code": "upstream",
        "upstream_commit": git_head(upstream),
        "workdir": str(workdir),
        "bits": args.bits,
        "noise_rate": args.noise_rate,
        "seed": args.seed,
        "epochs_trained": evals[-1]["epochs_trained"],
        "alpha": args.alpha,
        "beta": args.beta,
        "top_k": args.top_k,
        "threads": args.threads,
        "config": {k: str(v) for k, v in config.items()},
        "wall_seconds": wall,
        "evaluations": evals,
        "best_on_test": best,
        "last": evals[-1],
        "reliability_weights": weights_auc,
    }


def h5py_file(path: Path) -> Any:
    """An HDF5 file opened read-only."""
    import h5py

    return h5py.File(path, "r")


def git_head(repo: str) -> str:
    """The checkout's commit hash (empty when it is not a git checkout)."""
    head = Path(repo) / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (Path(repo) / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    """Run, write the JSON (temporary name, then renamed), print the RESULT line."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = parse_args(argv)
    out = Path(args.out).resolve()
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    b, last = result["best_on_test"], result["last"]
    log.info(
        "RESULT code=upstream bits=%d noise=%s seed=%d epochs=%d best(after %d) i2t=%.4f t2i=%.4f "
        "last i2t=%.4f t2i=%.4f i2t@k=%.4f t2i@k=%.4f wall_s=%.0f",
        args.bits,
        args.noise_rate,
        args.seed,
        result["epochs_trained"],
        b["epochs_trained"],
        b["i2t"],
        b["t2i"],
        last["i2t"],
        last["t2i"],
        last["i2t_at_k_project"],
        last["t2i_at_k_project"],
        result["wall_seconds"],
    )


if __name__ == "__main__":
    main()
