"""scan(on_report=...) hands over each report as it is made, in the final order."""

from engine.library.scan import scan
from engine.synth import checkpoints as synth


def test_on_report_streams_every_report_in_order(tmp_path):
    for i in (10, 2, 1):
        synth.write_checkpoint(tmp_path / f"_x{i:02d}-m.safetensors", synth.SynthSpec(scale=256, seed=i))
    synth.write_garbage(tmp_path / "_x05-broken.safetensors")
    seen = []
    reports = scan([tmp_path], on_report=seen.append)
    assert [r.model_id for r in seen] == [r.model_id for r in reports] == ["_x01", "_x02", "_x05", "_x10"]
    assert all(a is b for a, b in zip(seen, reports))
