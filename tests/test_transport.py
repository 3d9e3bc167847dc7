"""What a deployed message costs (issue 17 item 4): fewer objects per message, Flower 1.42's
fixed waits shortened, the app bundled without walking ignored folders. Each change must
leave what is computed and what is trusted exactly as it was: these tests check that."""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedspatial import pacing
from fedspatial.deployment.app_bundle import build_bundle, bundle_files, stage_app
from fedspatial.records import (
    LAYOUT,
    from_recorddict,
    is_packed,
    pack_content,
    to_recorddict,
    unpack_content,
)
from fedspatial.server.messaging import SiteGroup
from fedspatial.shared.protocol.payload import Payload

ARRAYS = {
    "float32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 4)),
    "strings": np.array(["a", "bcd"]),
    "bool": np.array([True, False, True]),
    "strided": np.arange(10, dtype=np.int64)[::3],
    "transposed": np.arange(6.0).reshape(2, 3).T,
}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- packing


def test_a_packed_payload_comes_back_bit_for_bit() -> None:
    content = to_recorddict(Payload(ARRAYS, {"k": 1}, {"m": 2.0}))
    assert list(content.array_records["arrays"]) == ["packed"] and is_packed(content)
    back = from_recorddict(content)
    _same(ARRAYS, back.arrays)
    assert back.config == {"k": 1} and back.metrics == {"m": 2.0}
    assert not is_packed(to_recorddict(Payload(ARRAYS), pack=False))
    _same(ARRAYS, from_recorddict(to_recorddict(Payload(ARRAYS), pack=False)).arrays)


def test_a_payload_of_python_objects_is_refused() -> None:
    with pytest.raises(TypeError, match="Python objects"):
        to_recorddict(Payload({"a": np.array([1, None], dtype=object), "b": np.zeros(1)}))


def test_packing_cuts_the_objects_of_a_message(flower_task_identity) -> None:
    """Flower moves each object with its own request at every hop: a model of 10 arrays is
    23 objects unpacked, 6 packed (Message, RecordDict, ArrayRecord, Array, chunk, layout)."""
    model = {f"layer{i}.weight": np.full((8, 4), i, dtype=np.float32) for i in range(10)}
    plain = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()})})
    packed = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()})})
    assert pack_content(packed) and not pack_content(packed)  # once only
    count = [len(get_all_nested_objects(Message(c, dst_node_id=1, message_type="train"))) for c in (plain, packed)]
    assert count == [23, 6]
    unpack_content(packed)
    assert LAYOUT not in packed.config_records
    _same(model, {k: v.numpy() for k, v in packed.array_records["arrays"].items()})


class _EchoGrid(FakeGrid):
    """Each site replies with the arrays it was sent plus its node id, as a ClientApp
    would (packed when the request was packed)."""

    def answer(self, message: Message) -> Message:
        request = from_recorddict(message.content)
        reply = Payload({k: v + message.metadata.dst_node_id for k, v in request.arrays.items()},
                        metrics={"num-examples": 1})
        return Message(to_recorddict(reply, pack=is_packed(message.content)), reply_to=message)


@pytest.mark.parametrize("pack", [True, False])
def test_the_grid_packs_a_model_for_the_journey_only(flower_task_identity, pack: bool) -> None:
    """A strategy hands the site group a model as Flower's ArrayRecord and gets each reply
    back as one, whether the journey was packed or not."""
    grid = _EchoGrid({1, 2})
    group = SiteGroup(grid, [1, 2], min_nodes=2, pack=pack)
    model = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    messages = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in model.items()}),
                                    "config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
                for n in (1, 2)]
    replies = group.send_and_receive(messages)
    assert all(is_packed(m.content) == pack for m in grid.sent.values())
    for reply, node in zip(replies, (1, 2), strict=True):
        assert not is_packed(reply.content)
        got = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        _same({k: v + node for k, v in model.items()}, got)
    assert isinstance(replies[0].content.metric_records["metrics"], MetricRecord)


# ----------------------------------------------------------------------------- Flower's waits


def test_pacing_is_quick_inside_a_run_and_flowers_own_when_idle() -> None:
    slept: list[float] = []
    p = pacing.Pacing(first=0.05, growth=2.0, reply=0.02, sleep=slept.append)
    p.sleep(3)  # no message yet: Flower's pace
    p.sleep(0.5)  # a reply is awaited
    for _ in range(8):
        p.sleep(3)
    p.sleep(0.5)
    p.sleep(3)
    assert slept == pytest.approx([3.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 0.02, 0.05])
    assert p.monotonic is not None  # everything else is the time module's
    with pytest.raises(ValueError):
        pacing.Pacing(first=0)
    with pytest.raises(ValueError):
        pacing.Pacing(growth=0.5)


def test_flowers_waits_change_only_in_the_pinned_version() -> None:
    import time

    import flwr
    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    assert flwr.__version__ == pacing.PACED_FLOWER, "a new Flower: check its waits, then pin the new version"
    assert loop.time is time and loop.pull_objects is pull_objects  # what pace() replaces is where it was
    fake = types.SimpleNamespace(time=time, pull_objects=pull_objects)
    assert not pacing.pace(fake, pacing.Pacing(), version="1.43.0") and fake.time is time
    assert not pacing.quick_object_pulls(fake, version="1.43.0") and fake.pull_objects is pull_objects
    assert pacing.pace(fake, pacing.Pacing(), version=pacing.PACED_FLOWER) and isinstance(fake.time, pacing.Pacing)
    assert pacing.quick_object_pulls(fake, version=pacing.PACED_FLOWER)
    assert isinstance(fake.pull_objects, functools.partial) and fake.pull_objects.func is pull_objects
    assert fake.pull_objects.keywords == {"initial_backoff": pacing.FIRST_RETRY, "backoff_cap": pacing.RETRY_CAP}
    assert not pacing.quick_object_pulls(fake, version=pacing.PACED_FLOWER)  # not twice


# ----------------------------------------------------------------------------- the app bundle


def _project(root: Path) -> Path:
    app = root / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "app"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "me"\n\n[tool.flwr.app.components]\n'
        'serverapp = "pkg.server:app"\nclientapp = "pkg.client:app"\n\n[tool.flwr.app.config]\nx = 1\n'
    )
    (app / ".gitignore").write_text(".venv/\nresults\n*.log\n")
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pkg" / "server.py").write_text("app = None\n")
    (app / "pkg" / "client.py").write_text("app = None\n")
    (app / "pkg" / "notes.log").write_text("ignored\n")
    (app / "README.md").write_text("# app\n")
    for folder in (".venv/lib/site", "results/run", "pkg/results"):
        (app / folder).mkdir(parents=True)
        (app / folder / "big.py").write_text("x = 1\n")
    os.symlink(app / "pkg" / "server.py", app / "pkg" / "link.py")
    return app


def test_the_bundle_is_flowers_own_byte_for_byte(tmp_path: Path) -> None:
    app = _project(tmp_path)
    flower = build_fab_from_disk(app)
    assert build_bundle(app) == flower
    files = bundle_files(app)
    assert "pkg/server.py" in files and not any(k.startswith((".venv", "results", "pkg/results")) for k in files)
    assert "pkg/link.py" not in files and "pkg/notes.log" not in files
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == flower
    assert (app / ".venv" / "lib" / "site" / "big.py").is_file()  # the app folder is only read


# ----------------------------------------------------------------------------- carried requests


class _RiderGrid(FakeGrid):
    """Sites that answer a message's own query and then each carried request, as the
    ClientApp does (``client/app.py``); ``refuse`` names carried queries they refuse."""

    def __init__(self, online: set[int], refuse: frozenset[str] = frozenset()) -> None:
        super().__init__(online)
        self.refuse = refuse

    def answer(self, message: Message) -> Message:
        from fedspatial.records import RIDER_ERROR, RIDERS, nest, rider_prefix, unnest

        request = from_recorddict(message.content)
        reply = to_recorddict(Payload(metrics={"site": message.metadata.dst_node_id, "x": request.number("x", 0)}))
        riders = message.content.config_records.get(RIDERS)
        for i, query in enumerate(list(riders[RIDERS]) if riders is not None else []):
            if query in self.refuse:
                reply[rider_prefix(i) + RIDER_ERROR] = ConfigRecord({"reason": "no"})
                continue
            rider = from_recorddict(unnest(message.content, rider_prefix(i)))
            nest(reply, rider_prefix(i), to_recorddict(Payload(
                {"a": rider.arrays["a"] * message.metadata.dst_node_id, "b": np.arange(3)},
                metrics={"early": 1.0})))
        return Message(reply, reply_to=message)


def _federation(grid: FakeGrid):
    from fedspatial.server.federation import FlowerFederation

    group = SiteGroup(grid, [1, 2], min_nodes=2)
    group.names = {1: "site_a", 2: "site_b"}
    return FlowerFederation(group, {})


def test_a_carried_request_is_answered_with_the_message_before_it(flower_task_identity) -> None:
    grid = _RiderGrid({1, 2})
    fed = _federation(grid)
    later = Payload({"a": np.ones(2)}, {"stage": "sums"})
    fed.carry([("markers", later)])
    fed.ask("finalize", Payload(config={"x": 3}))
    assert len(grid.sent) == 2  # one message per site, carrying the request
    replies = fed.ask("markers", Payload({"a": np.ones(2)}, {"stage": "sums"}), require_all=True)
    assert len(grid.sent) == 2  # ... answered from what came back: no new message
    assert list(replies) == ["site_a", "site_b"] and replies["site_b"].metrics == {"early": 1.0}
    _same({"a": np.full(2, 2.0), "b": np.arange(3)}, replies["site_b"].arrays)
    fed.ask("markers", later)  # kept replies serve one ask only
    assert len(grid.sent) == 4


def test_a_different_or_refused_carried_request_is_asked_again(flower_task_identity) -> None:
    grid = _RiderGrid({1, 2}, refuse=frozenset({"calibration"}))
    fed = _federation(grid)
    fed.carry([("markers", Payload({"a": np.ones(2)})), ("calibration", Payload(config={"t": 1}))])
    fed.ask("finalize")
    fed.ask("markers", Payload({"a": np.zeros(2)}))  # not what was carried
    fed.ask("calibration", Payload(config={"t": 1}))  # refused when carried
    assert len(grid.sent) == 6
    ignoring = FakeGrid({1, 2})  # sites that answer their own query only
    fed = _federation(ignoring)
    fed.carry([("markers", Payload({"a": np.ones(2)}))])
    fed.ask("finalize")
    fed.ask("markers", Payload({"a": np.ones(2)}))
    assert len(ignoring.sent) == 4


def test_a_site_answers_carried_requests_under_its_own_policy(monkeypatch) -> None:
    """The ClientApp half: each carried request passes the site policy first (a refused one
    is marked, not computed), then its phase answers it, after the message's own query."""
    import fedspatial.client.app as client_app
    from fedspatial.records import RIDER_ERROR, RIDERS, nest, rider_prefix, unnest
    from fedspatial.shared.config import ExperimentConfig
    from fedspatial.shared.privacy.policy import SitePolicy, refusal

    answered: list[tuple[str, Payload]] = []

    class Phase:
        def answer(self, site, query, request):
            answered.append((query, request))
            return Payload({"sum": request.arrays["a"] * 2}, metrics={"num-examples": 5})

    monkeypatch.setattr(client_app, "phase_for", lambda query: Phase())
    cfg = ExperimentConfig.from_dict({})
    strict = SitePolicy(allow_unnoised_releases=False)
    assert refusal(strict, "markers", cfg, Payload()) is not None  # what the site below refuses
    request = to_recorddict(Payload(config={"x": 1}))
    request[RIDERS] = ConfigRecord({RIDERS: ["markers", "calibration"]})
    for i in range(2):
        nest(request, rider_prefix(i), to_recorddict(Payload({"a": np.arange(3.0)}, {"stage": "sums"})))
    for policy, expected in ((None, ["markers", "calibration"]), (strict, [])):
        answered.clear()
        site = types.SimpleNamespace(name="site_a", cfg=cfg, private_roots=(), node=types.SimpleNamespace(policy=policy))
        reply = to_recorddict(Payload(metrics={"own": 1.0}))
        client_app._answer_riders(request, reply, site)
        assert [q for q, _ in answered] == expected
        for i in range(2):
            carried = unnest(reply, rider_prefix(i))
            if policy is None:
                _same({"sum": np.arange(3.0) * 2}, from_recorddict(carried).arrays)
            else:
                assert "site policy" in str(carried.config_records[RIDER_ERROR]["reason"])
