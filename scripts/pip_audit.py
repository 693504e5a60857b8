"""pip-audit of the pinned requirements and of the installed .venv, for CI.

    .venv/bin/python scripts/pip_audit.py [--service pypi|osv]

Two audits: the exact pins of requirements.txt and requirements-dev.txt (no resolution, so it
is fast and needs no build), and every distribution installed in this interpreter's
environment (the transitive dependencies the pins pull in).

Exit status: 0 clean; 1 a known vulnerability that is not accepted in ACCEPTED below (each
accepted one must be documented in docs/SECURITY.md); 2 the audit could not run or could not
look some package up (no network to the advisory service, a mirror without per-version data):
an audit that checked nothing must not pass as clean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP_AUDIT = Path(sys.executable).parent / "pip-audit"
# Vulnerability id -> why it is accepted (and the docs/SECURITY.md section that says so).
ACCEPTED: dict[str, str] = {}
TIMEOUT_S = 900


def audit(args: list[str], service: str) -> dict:
    command = [
        str(PIP_AUDIT),
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--vulnerability-service",
        service,
        "--timeout",
        "30",
        *args,
    ]
    for vuln_id in ACCEPTED:
        command += ["--ignore-vuln", vuln_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(
            f"error: pip-audit {' '.join(args)} failed ({done.returncode}): {tail}", file=sys.stderr
        )
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", choices=("pypi", "osv"), default="pypi")
    options = parser.parse_args(argv)
    if not PIP_AUDIT.exists():
        print(f"error: {PIP_AUDIT} not found; install requirements-dev.txt", file=sys.stderr)
        return 2

    reports = {
        "pins": audit(
            ["--no-deps", "--disable-pip", "-r", "requirements.txt", "-r", "requirements-dev.txt"],
            options.service,
        ),
        "environment": audit([], options.service),
    }
    vulnerable, skipped = [], []
    for scope, report in reports.items():
        deps = report.get("dependencies", [])
        audited = [d for d in deps if not d.get("skip_reason")]
        print(f"{scope}: {len(audited)} of {len(deps)} packages audited ({options.service})")
        for dep in deps:
            if dep.get("skip_reason"):
                skipped.append(f"{scope}: {dep['name']}: {dep['skip_reason']}")
            for vuln in dep.get("vulns") or []:
                fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
                vulnerable.append(
                    f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})"
                )
    for line in sorted(set(vulnerable)):
        print(f"VULNERABLE {line}")
    if vulnerable:
        print(
            "error: known vulnerabilities; upgrade the pins or accept them in ACCEPTED with a "
            "docs/SECURITY.md entry",
            file=sys.stderr,
        )
        return 1
    if skipped:
        for line in skipped[:20]:
            print(f"NOT AUDITED {line}")
        print(
            f"error: {len(skipped)} package(s) could not be audited (is the advisory service "
            f"reachable?)",
            file=sys.stderr,
        )
        return 2
    print("clean: no known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
