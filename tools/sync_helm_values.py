"""Copy the application of deploy/*.yaml into the Helm chart's values (Helm cannot read files outside the chart).

    python tools/sync_helm_values.py          # rewrite serve.httpOptions / args / deployments of both values files
    python tools/sync_helm_values.py --check  # exit 1 if they differ (tests/test_helm_chart.py checks this too)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [
    ("deploy/config.yaml", "helm/k2ray/values.yaml"),
    ("deploy/kimi-k2-thinking.yaml", "helm/k2ray/values-kimi-k2-thinking.yaml"),
]


# The chart owns these: the proxy binds 0.0.0.0 inside the pod (KubeRay's Service targets the pod IP) on serve.port.
CHART_HTTP_KEYS = ("host", "port")


def _app(deploy_file: str) -> tuple[dict, dict]:
    cfg = yaml.safe_load((ROOT / deploy_file).read_text())
    return cfg, cfg["applications"][0]


def _unset_defaults(args: dict, defaults: dict) -> dict:
    """``args`` plus ``key: null`` for each key the default values set and ``args`` does not: an override file is
    merged over values.yaml, and Helm drops a key set to null, so the default's key does not leak in."""
    out = dict(args)
    for k, v in defaults.items():
        if k not in out:
            out[k] = None
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _unset_defaults(out[k], v)
    return out


def block(deploy_file: str) -> str:
    cfg, app = _app(deploy_file)
    http = {k: v for k, v in cfg.get("http_options", {}).items() if k not in CHART_HTTP_KEYS}
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    args = app["args"]
    if deploy_file != PAIRS[0][0]:  # an override of the default values
        args = _unset_defaults(args, _app(PAIRS[0][0])[1]["args"])
    body = yaml.safe_dump({"httpOptions": http, "args": args, "deployments": deployments}, sort_keys=False,
                          width=120)
    lines = ["  # httpOptions (http_options but host and port), args and deployments:",
             f"  # generated from {deploy_file} by tools/sync_helm_values.py"]
    lines += ["  " + line if line else line for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def synced(values_text: str, deploy_file: str) -> str:
    lines = values_text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines)
                 if line.startswith(("  args:", "  # args and", "  httpOptions:", "  # httpOptions")))
    # The block ends at the first line after `deployments:` that is neither indented deeper nor blank/comment-only
    # inside it: a serve-level key (two spaces) other than args/deployments, or a top-level key.
    dep = next(i for i in range(start, len(lines)) if lines[i].startswith("  deployments:"))
    end = next(
        (i for i in range(dep + 1, len(lines))
         if lines[i].strip() and not lines[i].startswith("    ") and not lines[i].lstrip().startswith("#")),
        len(lines),
    )
    return "".join(lines[:start]) + block(deploy_file) + "".join(lines[end:])


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for deploy_file, values_file in PAIRS:
        path = ROOT / values_file
        old = path.read_text()
        new = synced(old, deploy_file)
        if new != old:
            stale.append(values_file)
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"stale: {', '.join(stale)} (run python tools/sync_helm_values.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
