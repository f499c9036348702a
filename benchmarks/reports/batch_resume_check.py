"""batch_resume_check.py: `streamsink batch` killed with SIGKILL mid-way, then resumed."""
from __future__ import annotations

from .base import Doc, no_result, source, table

NAMES = ("batch_resume_check",)


def markdown(results: dict, doc: Doc) -> str:
    result = results.get("batch_resume_check")
    if not result:
        return no_result("batch_resume_check")
    d = result.data
    s = d["settings"]
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    rows = [["records (prompts past max_model_len)",
             f"{s['records']} ({s['prompts_past_max_model_len']})"],
            ["engine arguments", f"`{' '.join(s['engine_args'])}`"],
            ["lines in the output at the SIGKILL", str(d["lines_at_kill"])],
            ["torn bytes after the last whole line", str(d["torn_tail_bytes"])],
            ["uninterrupted run's last line", f"`{d['uninterrupted_summary']}`"],
            ["resumed run's last line", f"`{d['rerun_summary']}`"],
            ["lines / unique ids in the resumed output", f"{d['lines']} / {d['unique_ids']}"],
            ["every input id present", yes(d["all_ids"])],
            ["rows equal to the uninterrupted run's", f"{d['rows_equal']} / {s['records']}"],
            ["rows past max_model_len", str(d["rows_past_max_model_len"])]]
    return "\n\n".join([table(["", ""], rows), source(result, doc)])
