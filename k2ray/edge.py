"""The edge: nginx in front of the Serve application, for the limits Ray Serve's HTTP proxy does not have (slow
clients, connections per client, an instant refusal over an in-flight cap), forwarding to the ingress replicas' own
HTTP servers (Serve's direct ingress) with the proxy as the fallback. See ``assets/edge/nginx.conf.template``.

One template serves both deployments: the Helm chart's nginx sidecar fills it in from its environment (the official
image's envsubst step), and ``k2ray edge`` fills it in here and runs the system's nginx in the foreground.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

TEMPLATE = Path(__file__).parent / "assets" / "edge" / "nginx.conf.template"
_VAR = re.compile(r"\$\{(K2RAY_EDGE_[A-Z_]+)\}")
_DURATION = re.compile(r"\d+(ms|s|m|h)?")
_SIZE = re.compile(r"\d+[kKmMgG]?")
_DIRECT = re.compile(r"([\w.\-\[\]:]+):(\d+)-(\d+)")
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
DIRECT_FIRST_PORT = 30000  # Ray Serve's default first direct-ingress HTTP port


@dataclass(frozen=True)
class EdgeSettings:
    """The template's variables (``K2RAY_EDGE_<FIELD>``)."""

    listen: str = "0.0.0.0:8080"          # nginx `listen`: PORT or HOST:PORT
    upstream: str = "127.0.0.1:8000"      # Serve's HTTP proxy, HOST:PORT
    # The ingress replicas' own HTTP servers (Serve's direct ingress), HOST:FIRST-LAST: tried first, with the proxy
    # as the backup; empty: the proxy only.
    direct: str = ""
    max_requests: int = 96                # generation requests in flight through this edge
    max_per_client: int = 256             # connections per client address
    header_timeout: str = "10s"
    body_timeout: str = "10s"
    max_body: str = "16m"
    keepalive_timeout: str = "65s"
    read_timeout: str = "660s"            # above Serve's request_timeout_s, so Serve's own 408 reaches the client

    def __post_init__(self):
        for name in ("max_requests", "max_per_client"):
            if not 1 <= int(getattr(self, name)) <= 65535:  # nginx's limit_conn range
                raise ValueError(f"edge {name} must be between 1 and 65535, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "read_timeout"):
            if not _DURATION.fullmatch(str(getattr(self, name))):
                raise ValueError(f"edge {name} must be an nginx duration such as 10s, got {getattr(self, name)!r}")
        if not _SIZE.fullmatch(str(self.max_body)):
            raise ValueError(f"edge max_body must be an nginx size such as 16m, got {self.max_body!r}")
        for name in ("listen", "upstream"):
            value = str(getattr(self, name))
            if not value or any(c in value for c in " ;{}'\"\n"):
                raise ValueError(f"edge {name} must be PORT or HOST:PORT, got {value!r}")
        m = _DIRECT.fullmatch(self.direct) if self.direct else None
        if self.direct and (m is None or not 0 <= int(m.group(3)) - int(m.group(2)) < 64):
            raise ValueError(f"edge direct must be HOST:FIRST-LAST, at most 64 ports (e.g. 127.0.0.1:30000-30003), "
                             f"got {self.direct!r}")

    def servers(self) -> str:
        """The upstream's ``server`` directives: the direct ports round-robin (a port with no replica behind it is
        skipped for 30 s after one refused connection), then Serve's proxy as the backup."""
        if not self.direct:
            return f"server {self.upstream};"
        m = _DIRECT.fullmatch(self.direct)
        host, first, last = m.group(1), int(m.group(2)), int(m.group(3))
        direct = [f"server {host}:{port} max_fails=1 fail_timeout=30s;" for port in range(first, last + 1)]
        return " ".join(direct + [f"server {self.upstream} backup;"])

    def environment(self) -> dict[str, str]:
        """The template's variables, as the sidecar's environment holds them."""
        env = {f"K2RAY_EDGE_{k.upper()}": str(v) for k, v in asdict(self).items() if k not in ("upstream", "direct")}
        env["K2RAY_EDGE_SERVERS"] = self.servers()
        return env


def render(settings: EdgeSettings, template: Optional[str] = None) -> str:
    """The template with its ``${K2RAY_EDGE_*}`` variables filled in (the http-context configuration)."""
    return fill(template if template is not None else TEMPLATE.read_text(), settings.environment())


def fill(template: str, env: dict[str, str]) -> str:
    """What envsubst does to the template given ``env``; a variable the template uses but ``env`` lacks is an error
    (envsubst would leave an empty string and nginx a broken directive)."""
    missing = sorted({m for m in _VAR.findall(template) if m not in env})
    if missing:
        raise ValueError(f"edge template variables not set: {', '.join(missing)}")
    return _VAR.sub(lambda m: env[m.group(1)], template)


def main_config(run_dir: Path) -> str:
    """A whole nginx.conf that includes ``run_dir/k2ray-edge.conf`` (the http-context configuration), for a non-root
    nginx with its files in ``run_dir``."""
    temp = {name: run_dir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    temp_lines = "\n".join(f"    {name}_temp_path {path};" for name, path in temp.items())
    return (f"worker_processes 1;\npid {run_dir / 'nginx.pid'};\nerror_log stderr warn;\ndaemon off;\n"
            f"events {{\n    worker_connections 8192;\n}}\n"
            f"http {{\n    access_log off;\n{temp_lines}\n    include {run_dir / 'k2ray-edge.conf'};\n}}\n")


def nginx_binary() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light; macOS: brew install "
                           "nginx)")
    return path


def write_config(settings: EdgeSettings, run_dir: Path) -> Path:
    """Write ``k2ray-edge.conf`` and ``nginx.conf`` into ``run_dir``; returns the main file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "k2ray-edge.conf").write_text(render(settings))
    main = run_dir / "nginx.conf"
    main.write_text(main_config(run_dir))
    return main


def start(settings: EdgeSettings, run_dir: Optional[Path] = None) -> subprocess.Popen:
    """Check the configuration with ``nginx -t``, then start nginx in the foreground as a child process."""
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="k2ray-edge-"))
    main = write_config(settings, run_dir)
    nginx = nginx_binary()
    check = subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", str(run_dir), "-c", str(main)], capture_output=True, text=True)
    if check.returncode != 0:
        lines = [line for line in check.stderr.splitlines() if line.strip()]
        why = next((line.split("] ", 1)[-1] for line in lines if "[emerg]" in line), lines[-1] if lines else "")
        raise RuntimeError(f"nginx rejected the edge configuration: {why or 'unknown error'}")
    return subprocess.Popen([nginx, "-e", "stderr", "-p", str(run_dir), "-c", str(main)])


def _max_replicas(app: dict, deployment: str) -> int:
    for d in app.get("deployments") or []:
        if d.get("name") == deployment:
            scaling = d.get("autoscaling_config") or {}
            return int(scaling.get("max_replicas") or d.get("num_replicas") or 1)
    return 1


def settings_from_deploy(path: Path, **overrides) -> EdgeSettings:
    """Edge settings for a Serve deploy file (``deploy/config.yaml``): the upstream is its ``http_options`` host and
    port (all interfaces -> loopback), with the ingress replicas' own ports first when the application turns Serve's
    direct ingress on (``runtime_env.env_vars.RAY_SERVE_ENABLE_DIRECT_INGRESS: "1"``); the in-flight cap is what its
    model groups hold at their largest
    (``max_num_seqs + max_queued_requests`` per group, times the K2Router deployment's most replicas). Below that
    cap the ingress still refuses exactly, by the groups that are ready; the edge's cap keeps a burst past the
    largest size from reaching Serve at all."""
    import yaml

    from k2ray.serve.config import ServeArgs

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the deploy file: {e}") from e
    http = (doc or {}).get("http_options") or {}
    apps = [a for a in (doc or {}).get("applications") or [] if str(a.get("import_path", "")).startswith("k2ray.")]
    if not apps:
        raise ValueError(f"{path}: no application with a k2ray import_path")
    app = apps[0]
    args = ServeArgs(**(app.get("args") or {}))
    groups = _max_replicas(app, "K2Router")
    host = str(http.get("host", "127.0.0.1"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    env = ((app.get("runtime_env") or {}).get("env_vars") or {})
    direct = ""
    if str(env.get(DIRECT_INGRESS_ENV, "0")) == "1":
        # Each ingress replica of a node takes the next free port from the first one; twice the most replicas
        # leaves room for ports still held by replicas being replaced.
        first = int(env.get(DIRECT_PORT_ENV, DIRECT_FIRST_PORT))
        direct = f"{host}:{first}-{first + 2 * _max_replicas(app, 'OpenAIIngress') - 1}"
    values = {"upstream": f"{host}:{int(http.get('port', 8000))}", "direct": direct,
              "max_requests": args.group_capacity * groups,
              "max_body": f"{max(1, -(-args.max_request_bytes // (1 << 20)))}m",
              "read_timeout": f"{int(http.get('request_timeout_s') or 600) + 60}s"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return EdgeSettings(**values)
