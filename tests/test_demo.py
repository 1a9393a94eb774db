"""`make demo` (`mfjax demo`), the README's first command, end to end on a small setting."""
import json
import os

from mfjax import demo


def test_demo_trains_studies_and_reports(tmp_path, capsys):
  out = demo.run(str(tmp_path / "demo"), num_images=40, image_size=32, epochs=1, seeds=1,
                 models=("deit_base_patch16",))
  runs = os.path.join(out, "runs")
  results = [os.path.join(d, "result.json") for d, _, files in os.walk(runs) if "result.json" in files]
  protocols = {json.load(open(r))["config"]["protocol"]["name"] for r in results}
  assert protocols == set(demo.PROTOCOLS)
  knn = json.load(open(os.path.join(runs, "knn", "deit_base_patch16", "knn.json")))
  assert sorted(knn["k"], key=int) == ["5", "10", "20"]  # 28 training images: k=50 left out
  assert any(name.startswith("cka_") for _, _, files in os.walk(runs) for name in files)
  report = open(os.path.join(out, "report", "report.md")).read()
  assert "deit_base_patch16" in report and "frozen_linear" in report
  printed = capsys.readouterr().out
  assert "[5/5] writing the report" in printed and "Done in" in printed
