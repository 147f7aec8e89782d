"""The read-side mutation fuzzer (tools/fuzz.py) on a small, seeded budget.

It runs as a subprocess under its own RLIMIT_AS and a hard timeout, so neither a hang nor a
runaway allocation in the code under test can take the test run with it. A finding (an exception
that is not a packerfs error, a CLI traceback or odd exit code, a timeout) fails the test with the
case seeds to replay (`tools/fuzz.py --replay SEED --out DIR`). Findings in the files listed in
fuzz.KNOWN_FILES are printed, not failed on, until their fixes are merged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 35  # the campaign; the CLI runs and start-up fit in the rest of a 60 s budget


def test_fuzz_small_budget():
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH") or str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--seconds", str(SECONDS), "--seed", "20260901",
         "--json", "--memory-mb", "2048", "--case-timeout", "10", "--cli-every", "40"],
        capture_output=True, text=True, timeout=SECONDS + 120, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for f in result["known"]:
        print(f"known (not failed on): {f['kind']} at {f['where']} x{f['count']}: {f['error']} "
              f"(case seed {f['case_seed']})")
    assert result["cases"] >= 30, result
    problems = [
        f"{f['kind']} at {f['where']} x{f['count']}: {f['error']}\n  case: {f['case'][:300]}\n"
        f"  replay: tools/fuzz.py --replay {f['case_seed']} --out DIR\n{f.get('traceback', '')[-1500:]}"
        for f in result["findings"]
    ]
    assert not problems, "\n\n".join(problems)
