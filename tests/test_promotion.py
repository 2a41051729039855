"""The registry never crowns a broken or incomparable model, and two promoters cannot both win."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from test_serving import register_small_model

from pipeline.method.model import RSHNLModel
from pipeline.method.weights import encode
from pipeline.tracking import runs as tracking
from pipeline.training import guards

KEY = {"data_version": "tiny/v1@aaa", "bits": "16", "method": "rshnl"}


# --- guards: non-finite losses, weights, embeddings -------------------------------------------


def test_nonfinite_losses_name_the_term_and_first_epoch():
    history = {"epoch": [1, 2, 3], "loss": [1.0, 0.9, 0.8], "loss_chl": [0.5, math.nan, 0.4]}
    assert guards.nonfinite_losses(history) == [
        "loss_chl is nan at epoch 2 (1 of 3 epochs non-finite)"
    ]
    history["loss"][2] = math.inf
    lines = guards.nonfinite_losses(history)
    assert lines[0].startswith("loss is inf at epoch 3")
    assert guards.nonfinite_losses({"epoch": [1], "loss": [0.3], "valid_map_mean": [0.2]}) == []


def _model(bits: int = 8) -> RSHNLModel:
    torch.manual_seed(0)
    return RSHNLModel(image_dim=6, text_dim=5, num_classes=3, bits=bits, hidden=8).eval()


def test_checked_encoder_matches_encode_and_counts_nonfinite_embeddings():
    model = _model()
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    enc = guards.CheckedEncoder(model, batch_size=4)
    np.testing.assert_array_equal(enc(x, "image"), encode(model, x, "image", 4))
    assert enc.problems() == []
    assert guards.nonfinite_tensors(model.state_dict().items()) == []

    x[3, 0] = np.inf  # one item's features overflow the head
    enc = guards.CheckedEncoder(model, batch_size=4)
    enc(x, "image")
    assert enc.problems() == ["image embeddings are non-finite for 1 of 10 test items"]

    with torch.no_grad():
        model.text_head.net[0].weight[0, 0] = math.nan
    enc = guards.CheckedEncoder(model)
    enc(np.ones((4, 5), dtype=np.float32), "text")
    assert enc.problems() == ["text embeddings are non-finite for 4 of 4 test items"]
    (line,) = guards.nonfinite_tensors(model.state_dict().items())
    assert line.startswith("1 of ") and "text_head.net.0.weight" in line


# --- guards: collapsed codes -------------------------------------------------------------------


def _class_codes(labels: np.ndarray, bits: int = 16) -> np.ndarray:
    table = np.where(np.random.default_rng(1).random((labels.max() + 1, bits)) < 0.5, 1, -1)
    return table[labels].astype(np.int8)


def test_one_code_for_every_item_is_collapsed():
    labels = np.repeat(np.arange(6), 8)
    codes = np.full((48, 16), -1, dtype=np.int8)  # what sign() of NaN embeddings gives
    why = guards.code_collapse(codes, labels)
    assert why is not None and why.startswith("1 distinct code(s) over 48 items")


def test_nearly_one_code_is_collapsed_but_working_codes_are_not():
    labels = np.repeat(np.arange(6), 8)
    codes = np.full((48, 16), 1, dtype=np.int8)
    codes[0, 0] = -1  # 47 items share one code: 0.15 bits
    assert guards.code_collapse(codes, labels).startswith("2 distinct code(s)")
    assert guards.code_collapse(_class_codes(labels), labels) is None  # one code per class
    random_codes = np.where(np.random.default_rng(2).random((48, 16)) < 0.5, 1, -1)
    assert guards.code_collapse(random_codes, labels) is None  # untrained: informative spread
    # a perfect model on an imbalanced two-class split has exactly the labels' entropy
    skewed = np.array([0] * 45 + [1] * 5)
    assert guards.code_collapse(_class_codes(skewed), skewed) is None
    # a split with one label carries nothing to lose
    assert guards.code_collapse(np.ones((10, 4)), np.zeros(10, dtype=int)) is None


def test_collapsed_codes_names_split_and_modality():
    labels = np.eye(4, dtype=np.int8)[np.repeat(np.arange(4), 5)]  # one-hot rows
    good = _class_codes(labels.argmax(1))
    dead = np.ones_like(good)
    query = (good, dead, labels)
    assert guards.collapsed_codes((query, query)) == [
        "query text codes collapsed: 1 distinct code(s) over 20 items "
        "(0.000 bits; labels 2.000 bits, needed ≥ 0.500)"
    ]
    database = (dead, good, labels)
    lines = guards.collapsed_codes(((good, good, labels), database))
    assert len(lines) == 1 and lines[0].startswith("database image codes collapsed")


# --- comparability -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    """One sqlite registry for the module (creating one takes seconds); a model name per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version(client: MlflowClient, name: str, valid_map: float, **key: str) -> str:
    """A registered version with the tags :func:`tracking._register` writes (no artifacts)."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {**KEY, **key, "valid_map_mean": repr(valid_map)}
    mv = client.create_model_version(name, "file:///nonexistent/model", tags=tags)
    return str(mv.version)


def _champion(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, tracking.CHAMPION).version)


def test_promotion_compares_only_same_data_version_bits_and_method(registry):
    _, client = registry
    name = "comparable"
    v1 = _version(client, name, 0.40)
    assert tracking.promote(client, name, v1, KEY, 0.40)[0]  # no champion yet

    for field, value in (("bits", "100000"), ("method", "scbch"), ("data_version", "tiny/v2@b")):
        key = {**KEY, field: value}
        v = _version(client, name, 0.99, **{field: value})
        ok, reason = tracking.promote(client, name, v, key, 0.99)
        assert not ok and _champion(client, name) == v1
        assert f"differ in {field} are not comparable" in reason
        assert f"{field} {KEY[field]}" in reason and f"{field} {value}" in reason

    v_better = _version(client, name, 0.45)
    ok, reason = tracking.promote(client, name, v_better, KEY, 0.45)
    assert ok and _champion(client, name) == v_better and "beats" in reason


def test_champion_without_recorded_key_is_not_comparable(registry):
    uri, client = registry
    name = "legacy"
    client.create_registered_model(name)
    old = client.create_model_version(name, "file:///nonexistent/model")  # no tags, no run
    client.set_registered_model_alias(name, tracking.CHAMPION, old.version)
    v = _version(client, name, 0.9)
    ok, reason = tracking.promote(client, name, v, KEY, 0.9)
    assert not ok and "bits unrecorded" in reason and _champion(client, name) == str(old.version)

    # a champion registered before versions were tagged: its run's params supply the key
    name = "legacy-run"
    run_id = tracking.start_run(uri, "tests", "old", {"bits": 16, "method": "rshnl"}, {})
    client.create_registered_model(name)
    old = client.create_model_version(
        name,
        "file:///nonexistent/model",
        run_id=run_id,
        tags={"data_version": KEY["data_version"], "valid_map_mean": "0.3"},
    )
    client.set_registered_model_alias(name, tracking.CHAMPION, old.version)
    v = _version(client, name, 0.5)
    ok, reason = tracking.promote(client, name, v, KEY, 0.5)
    assert ok and "beats" in reason and "(0.3000)" in reason


# --- compare-and-set ---------------------------------------------------------------------------


class _SlowChampionReads:
    """An MlflowClient that pauses after reading the champion: widens the read→set window."""

    def __init__(self, client: MlflowClient, pause: float) -> None:
        self._client, self._pause = client, pause

    def __getattr__(self, attr: str):
        return getattr(self._client, attr)

    def get_model_version_by_alias(self, *args, **kwargs):
        mv = self._client.get_model_version_by_alias(*args, **kwargs)
        time.sleep(self._pause)
        return mv


def _promoter(
    uri: str,
    name: str,
    version: str,
    valid_map: float,
    pause: float,
    results: dict[str, tuple[bool, str]],
    errors: list[BaseException],
) -> None:
    """One promoter with its own client, as a separate training run would have."""
    try:
        client = _SlowChampionReads(MlflowClient(tracking_uri=uri, registry_uri=uri), pause)
        results[version] = tracking.promote(client, name, version, KEY, valid_map)
    except BaseException as e:
        errors.append(e)


@pytest.mark.parametrize("worse_first", [True, False])
def test_two_concurrent_promoters_the_better_one_always_wins(registry, worse_first):
    uri, _ = registry
    for rep in range(3):
        name = f"race-{worse_first}-{rep}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        old = _version(client, name, 0.30)
        client.set_registered_model_alias(name, tracking.CHAMPION, old)
        worse, better = _version(client, name, 0.40), _version(client, name, 0.50)
        results: dict[str, tuple[bool, str]] = {}
        errors: list[BaseException] = []
        # The worse one reads the old champion, then pauses long enough for the better one to
        # read and set: without compare-and-set it overwrites the better one.
        slow, fast = (
            threading.Thread(
                target=_promoter, args=(uri, name, version, valid_map, pause, results, errors)
            )
            for version, valid_map, pause in ((worse, 0.40, 0.6), (better, 0.50, 0.0))
        )
        first, second = (slow, fast) if worse_first else (fast, slow)
        first.start()
        time.sleep(0.15)
        second.start()
        first.join(30)
        second.join(30)
        assert not errors
        assert _champion(client, name) == better, (rep, results)
        assert results[better][0] is True and "beats" in results[better][1]
        if worse_first:  # it was champion until the better one, deciding after it, beat it
            assert results[worse][0] is True and f"version {worse}" in results[better][1]
        else:
            assert results[worse][0] is False and "does not beat" in results[worse][1]
        assert not client.search_registered_models(
            filter_string=f"name = '{name}{tracking.LOCK_SUFFIX}'"
        )  # the lock is released


def test_lock_is_exclusive_and_an_expired_one_is_taken_over(registry):
    _, client = registry
    lock = f"locked{tracking.LOCK_SUFFIX}"
    with tracking.promotion_lock(client, "locked") as owner:
        assert client.get_registered_model(lock).tags["owner"] == owner
        with pytest.raises(tracking.PromotionError, match=r"still held by .*after 0 s"):
            with tracking.promotion_lock(client, "locked", wait_seconds=0.3):
                pass
    assert not client.search_registered_models(filter_string=f"name = '{lock}'")

    client.create_registered_model(lock, tags={"owner": "dead:1", "expires": repr(time.time())})
    t0 = time.monotonic()
    with tracking.promotion_lock(client, "locked", wait_seconds=5) as owner:
        assert owner != "dead:1" and client.get_registered_model(lock).tags["owner"] == owner
    assert time.monotonic() - t0 < 3


def test_a_held_lock_leaves_the_version_registered_but_not_promoted(
    registry, tmp_path, monkeypatch
):
    uri, client = registry
    name = "held"
    first = register_small_model(tmp_path, name=name, valid_map=0.3, seed=1, tracking_uri=uri)
    assert first["registered"]["alias"] == "champion"
    client.create_registered_model(
        f"{name}{tracking.LOCK_SUFFIX}",
        tags={"owner": "busy:1", "expires": repr(time.time() + 600)},
    )
    monkeypatch.setattr(tracking, "LOCK_WAIT_SECONDS", 0.3)
    second = register_small_model(tmp_path, name=name, valid_map=0.9, seed=2, tracking_uri=uri)
    assert second["registered"]["alias"] is None and _champion(client, name) == "1"
    assert "still held by busy:1" in second["registered"]["promotion_reason"]
    assert client.get_run(second["run_id"]).info.status == "FINISHED"


# --- a broken run fails, is marked FAILED and registers nothing (Ray, ~40 s) -------------------


@pytest.mark.ray
def test_infinite_learning_rate_run_fails_and_registers_nothing(
    ray_cluster, tiny_dataset, tmp_path
):
    from jobs import train

    db = tmp_path / "mlflow.db"
    config = tmp_path / "inf.yaml"
    config.write_text(yaml.safe_dump({"lr": math.inf}))  # written as `lr: .inf`
    assert ".inf" in config.read_text()
    argv = [
        "--config",
        str(config),
        "--dataset",
        tiny_dataset,
        "--bits",
        "16",
        "--hidden-dim",
        "32",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        "1",
        "--storage-path",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--experiment-name",
        "broken",
        "--registered-model-name",
        "rshnl-broken",
    ]
    with pytest.raises(SystemExit) as exit_info:
        train.run_main(lambda: train.main(argv))
    assert exit_info.value.code == 1

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert run.info.status == "FAILED"
    error = run.data.tags["error"]
    assert error.startswith("TrainingError:") and "unusable model" in error
    assert "loss is nan at epoch 1" in error and "codes collapsed" in error
    assert "registered_model" not in run.data.tags
    assert client.search_registered_models() == []


def test_lock_released_during_a_competing_create_is_retried(registry):
    """The SQL store answers a duplicate create by reading the model back; when the holder
    deletes the lock in between, that read says 'not found'. The lock must be retried, not
    fail the promotion."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    _, client = registry
    calls = []

    class Racing:
        def __getattr__(self, attr):
            return getattr(client, attr)

        def create_registered_model(self, name, **kw):
            calls.append(name)
            if len(calls) == 1:
                raise MlflowException("Registered Model not found", RESOURCE_DOES_NOT_EXIST)
            return client.create_registered_model(name, **kw)

    with tracking.promotion_lock(Racing(), "racing", wait_seconds=5) as owner:
        lock = client.get_registered_model(f"racing{tracking.LOCK_SUFFIX}")
        assert lock.tags["owner"] == owner
    assert len(calls) == 2
    name = f"racing{tracking.LOCK_SUFFIX}"
    assert not client.search_registered_models(filter_string=f"name = '{name}'")
