import json
import re

import jsonschema
import numpy as np

from echoflow.audit import build_report, dcr_stats, decide_samples, write_report
from echoflow.audit.report import SCHEMA_PATH, SIMILARITY_PNG
from tests.ef_videos import write_ef_videos


def test_json_validates_and_html_is_self_contained(cohort: dict, tmp_path) -> None:
    generated = np.concatenate([cohort["train"]["a"][:5], cohort["fresh"][:50]])
    result = decide_samples(generated, cohort["indexes"], cohort["calibration"].thresholds())
    report = build_report(
        result, cohort["calibration"],
        index_info={s: {"index": i.kind, "ntotal": i.ntotal, "threshold_recall": 1.0}
                    for s, i in cohort["indexes"].items()},
        canaries={"exact": (5, 5), "all": (5, 5)},
        dcr=dcr_stats(result.similarity, result.similarity - 0.1, n_train=3000, n_heldout=150),
    )
    pairs = [(np.zeros((1, 8, 8)), np.ones((8, 8)), "#0 sim 1.000")]
    generated = write_ef_videos(tmp_path / "generated", [38.0, 41.0, 80.0], site="synthetic", frames=20)
    real = write_ef_videos(tmp_path / "site_a", [60.0], site="site_a", frames=20, seed=1)
    out = tmp_path / "audit"
    json_path, html_path = write_report(report, cohort["calibration"], result, out, pairs=pairs,
                                        generated_videos=generated, real_videos=real)
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(json.loads(json_path.read_text()), schema)
    assert report["counts"]["withheld"] >= 5
    page = html_path.read_text()
    assert "http" not in page.lower() and "<script" not in page.lower()
    assert len(re.findall(r"data:image/png;base64,", page)) == 2 + 4  # histogram, pairs, 4 first frames
    assert len(re.findall(r"data:image/gif;base64,", page)) == 4 and page.count("no video in this range") == 2
    assert (out / SIMILARITY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the histogram, as a file too
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "ef_40_to_55_generated.gif", "ef_55_and_above_generated.gif", "ef_55_and_above_real.gif",
        "ef_below_40_generated.gif"]


def test_failed_audit_report_validates(cohort: dict, tmp_path) -> None:
    class Broken:
        def search(self, queries, *, k, threshold):
            raise OSError("unreachable")

    result = decide_samples(cohort["fresh"][:10], {"a": cohort["indexes"]["a"], "x": Broken()}, 0.9)
    report = build_report(result, cohort["calibration"])
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["status"] == "failed" and report["counts"]["released"] == 0
    (tmp_path / SIMILARITY_PNG).write_bytes(b"from an earlier audit")
    write_report(report, cohort["calibration"], result, tmp_path)
    assert not (tmp_path / SIMILARITY_PNG).exists()  # no histogram of a failed audit, not even a stale one
