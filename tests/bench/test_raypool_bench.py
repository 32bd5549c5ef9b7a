"""bench.raypool's helpers (the figures themselves run live servers and a Ray cluster: scripts only)."""

from __future__ import annotations

from bench.raypool import learned_overhead_ms, servable_classes
from slonn.scheduler.config import load_classes
from slonn.workers.artifact import ModelManifest, save_artifact
from slonn.workers.model import MLPArchitecture, SLOAwareMLP


def test_classes_keep_their_deadlines_and_floors_are_capped_at_the_model_best_accuracy(tmp_path):
    arch = MLPArchitecture(in_features=8, hidden=(16,), out_features=3)
    manifest = ModelManifest(name="m", arch=arch, levels=(1.0, 0.5), accuracy={1.0: 0.9555, 0.5: 0.95})
    model_dir = save_artifact(SLOAwareMLP(arch), manifest, tmp_path / "m")
    capped = load_classes(servable_classes(model_dir, tmp_path / "classes.toml"))
    packaged = load_classes()
    assert set(capped) == set(packaged)
    for name, c in capped.items():
        assert c.latency_ms == packaged[name].latency_ms and c.on_late == packaged[name].on_late
        assert c.min_accuracy == min(packaged[name].min_accuracy, 0.955)  # every class servable


def test_the_learned_overhead_is_the_last_stats_line(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("stats: x; overhead 1.00 ms; safe\nother\nstats: y; overhead 12.50 ms; safe\n")
    assert learned_overhead_ms(log) == 12.5
    log.write_text("no stats yet\n")
    assert learned_overhead_ms(log) is None
