import json
import re

import jsonschema
import numpy as np

from echoflow.audit import audit, build_report, dcr_stats, write_report
from echoflow.audit.report import SCHEMA_PATH


def test_json_validates_and_html_is_self_contained(cohort: dict, tmp_path) -> None:
    generated = np.concatenate([cohort["train"]["a"][:5], cohort["fresh"][:50]])
    result = audit(generated, cohort["indexes"], cohort["calibration"].thresholds())
    report = build_report(
        result, cohort["calibration"],
        index_info={s: {"index": i.kind, "ntotal": i.ntotal, "threshold_recall": 1.0}
                    for s, i in cohort["indexes"].items()},
        canaries={"exact": (5, 5), "all": (5, 5)},
        dcr=dcr_stats(result.similarity, result.similarity - 0.1, n_train=3000, n_heldout=150),
    )
    pairs = [(np.zeros((1, 8, 8)), np.ones((8, 8)), "#0 sim 1.000")]
    json_path, html_path = write_report(report, cohort["calibration"], result, tmp_path, pairs=pairs)
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(json.loads(json_path.read_text()), schema)
    assert report["counts"]["withheld"] >= 5
    page = html_path.read_text()
    assert "http" not in page.lower() and "<script" not in page.lower()
    assert len(re.findall(r"data:image/png;base64,", page)) == 2


def test_failed_audit_report_validates(cohort: dict, tmp_path) -> None:
    class Broken:
        def search(self, queries, *, k, threshold):
            raise OSError("unreachable")

    result = audit(cohort["fresh"][:10], {"a": cohort["indexes"]["a"], "x": Broken()}, 0.9)
    report = build_report(result, cohort["calibration"])
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["status"] == "failed" and report["counts"]["released"] == 0
    write_report(report, cohort["calibration"], result, tmp_path)
