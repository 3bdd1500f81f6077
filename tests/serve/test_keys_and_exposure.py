"""API keys from every source (args, a file, $K2RAY_API_KEYS), failing closed; the Helm chart's Secret reaching the
ingress; and what /v1/k2ray/layout and /v1/k2ray/stats show with and without keys. Ray-free: the ingress runs in a
TestClient over the scripted model group of test_openai_frontend."""

from __future__ import annotations

import copy

import helm_python as helm
import pytest
import yaml
from fastapi.testclient import TestClient

from k2ray.config import ConfigError
from k2ray.serve.config import KEYS_ENV, ServeArgs
from k2ray.serve.ingress import OpenAIIngress
from k2ray.tokenizer import KimiTokenizer
from k2ray.tokenizer.tiny import DATA_DIR

from ..test_helm_chart import CHART, NAMESPACE, RELEASE, pod_templates, ray_container, rayservice, serve_config
from .serve_helpers import assert_openai_error
from .test_openai_frontend import MODEL, ScriptedGroups

NODE_IP, NODE_ID = "10.1.2.3", "f" * 56
LAYOUT = {"model": MODEL, "group": "g0", "state": "ready",
          "attention_workers": [{"rank": 0, "node_id": NODE_ID, "node_ip": NODE_IP, "pid": 4242}],
          "expert_shards": [{"shard": s, "rank": 1 + s, "node_id": NODE_ID, "node_ip": NODE_IP, "pid": 4243 + s,
                             "experts": list(range(s * 16, s * 16 + 16))} for s in range(2)],
          "backend": "gloo", "strategy": "PACK",
          "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 2, "device": "cpu"}}
STATS = {"group": "g0", "state": "ready", "error": f"worker on {NODE_IP} died", "inflight": 3, "num_running": 2,
         "num_waiting": 1, "kv_cache_usage": 0.25, "kv_cache_usage_per_attention_worker": [0.25],
         "num_finished": 7, "num_aborted": 1, "phase_time_s": {"execute": 1.5}, "last_step": {"batch": 2},
         "num_free_blocks": 30, "num_kv_blocks": 40}

REBALANCE = {"group": "g0", "started": True, "version": 1, "window_steps": 40, "old_balancedness": 0.75,
             "new_balancedness": 0.99, "layers": {"1": {"old": 0.75, "new": 0.99}}}


class LayoutGroups(ScriptedGroups):
    """The scripted group with a Ray model group's real layout and stats shapes."""

    async def layout(self) -> dict:
        return copy.deepcopy(LAYOUT)

    async def stats(self) -> dict:
        return copy.deepcopy(STATS)

    async def rebalance(self) -> dict:
        return copy.deepcopy(REBALANCE)

    async def resize(self, attention_workers, expert_shards) -> dict:
        """As the router answers: within min 1 .. max 3 expert shards, attention workers fixed at 1."""
        self.resized = (attention_workers, expert_shards)
        if expert_shards is not None and not 1 <= expert_shards <= 3:
            return {"started": False, "reason": f"expert_shards={expert_shards} is outside parallel.elastic."
                    "expert_shards (min 1, max 3)", "error_param": "expert_shards"}
        return {"group": "g0", "started": True, "from": {"attention_workers": 1, "expert_shards": 2},
                "to": {"attention_workers": attention_workers or 1, "expert_shards": expert_shards or 2}}


@pytest.fixture(scope="module")
def tokenizer():
    return KimiTokenizer.from_dir(DATA_DIR)


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)


def _client(tokenizer, args: dict, client=("203.0.113.9", 40000), **kw) -> TestClient:
    ingress = OpenAIIngress(LayoutGroups(tokenizer), {"model": "k2ray-tiny", "served_model_name": MODEL, **args})
    return TestClient(ingress.build_asgi_app(), client=client, **kw)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


# -- key sources ------------------------------------------------------------------------------------------------------
def test_keys_from_args_file_and_env_are_merged(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# rotated 2025-01\nsk-file-1\n\n  sk-file-2  \n# sk-commented-out\nsk-args\n")
    monkeypatch.setenv(KEYS_ENV, "sk-env-1, sk-env-2\nsk-env-3,")
    args = ServeArgs(api_keys=["sk-args"], api_keys_file=str(f))
    assert args.resolved_api_keys() == ["sk-args", "sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2", "sk-env-3"]
    monkeypatch.setenv(KEYS_ENV, "sk-changed")  # resolved once: the ingress and its checks see the same keys
    assert args.resolved_api_keys()[-1] == "sk-env-3"
    monkeypatch.delenv(KEYS_ENV)
    assert ServeArgs().resolved_api_keys() == []
    with pytest.raises(ValueError):
        ServeArgs(api_keys=["sk-1", " "])


@pytest.mark.parametrize("case, source", [("missing file", "api_keys_file"), ("empty file", "api_keys_file"),
                                          ("blank env", KEYS_ENV), ("commas only env", KEYS_ENV)])
def test_configured_but_unreadable_keys_refuse_to_start(tmp_path, monkeypatch, tokenizer, case, source):
    args = {"api_keys": ["sk-args"]}  # other keys do not make up for a broken source
    if case == "missing file":
        args["api_keys_file"] = str(tmp_path / "nope")
    elif case == "empty file":
        (tmp_path / "keys").write_text("# no keys yet\n\n")
        args["api_keys_file"] = str(tmp_path / "keys")
    else:
        monkeypatch.setenv(KEYS_ENV, "  \n " if case == "blank env" else " , ,")
    with pytest.raises(ConfigError) as err:
        _client(tokenizer, args)
    msg = str(err.value)
    assert source in msg and "\n" not in msg, msg


# -- the Helm chart's Secret reaches the ingress --------------------------------------------------------------------
def test_chart_secret_keys_are_enforced(tokenizer, monkeypatch):
    """Render the chart with apiKeys.keys, give the ingress the environment a pod gets (K2RAY_API_KEYS resolved from
    the rendered Secret) and the rendered serveConfigV2 args: no key is refused, a Secret key is let in."""
    with helm.Chart.load(CHART) as chart:
        text = chart.render({"apiKeys": {"keys": ["sk-chart-1", "sk-chart-2"]}}, name=RELEASE, namespace=NAMESPACE,
                            is_install=True)
    objs = [d for path, t in sorted(text.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(t) if d]
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    rs = rayservice(objs)
    env = {e["name"]: e for e in ray_container(pod_templates(rs)["head"])["env"]}
    ref = env[KEYS_ENV]["valueFrom"]["secretKeyRef"]
    monkeypatch.setenv(KEYS_ENV, secrets[ref["name"]]["stringData"][ref["key"]])
    args = serve_config(objs)["applications"][0]["args"]
    assert args["api_keys"] == []  # the keys are only in the Secret
    args = {**args, "model": "k2ray-tiny", "served_model_name": MODEL}  # the scripted group's tokenizer
    ingress = OpenAIIngress(LayoutGroups(tokenizer), args)
    with TestClient(ingress.build_asgi_app()) as c:
        for path in ("/v1/models", "/v1/k2ray/layout", "/v1/k2ray/stats"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"}
                      ).status_code == 401
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-chart-2"})
        assert r.status_code == 200, r.text
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-chart-1"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


# -- layout and stats exposure ----------------------------------------------------------------------------------------
def test_layout_and_stats_need_the_key_when_keys_are_on(tokenizer):
    with _client(tokenizer, {"api_keys": ["sk-1"]}) as c:
        for path in ("/v1/k2ray/layout", "/v1/k2ray/stats"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer sk-2"}).status_code == 401, path
        auth = {"Authorization": "Bearer sk-1"}
        assert c.get("/v1/k2ray/layout", headers=auth).json() == LAYOUT  # a key holder sees everything
        assert c.get("/v1/k2ray/stats", headers=auth).json() == STATS


def test_layout_and_stats_redacted_without_keys(tokenizer):
    with _client(tokenizer, {}) as c:
        lay = c.get("/v1/k2ray/layout")
        st = c.get("/v1/k2ray/stats")
    assert lay.status_code == 200 and st.status_code == 200
    for body in (lay.text, st.text):
        assert NODE_IP not in body and NODE_ID not in body and "4242" not in body
    lay = lay.json()
    assert lay["attention_workers"] == [{"rank": 0}]  # the structure stays: counts, ranks, experts
    assert [(s["shard"], s["experts"]) for s in lay["expert_shards"]] == [(0, list(range(16))),
                                                                         (1, list(range(16, 32)))]
    assert all(set(s) == {"shard", "rank", "experts"} for s in lay["expert_shards"])
    assert {k: lay[k] for k in ("model", "group", "state", "backend", "parallel")} == {
        k: LAYOUT[k] for k in ("model", "group", "state", "backend", "parallel")}
    st = st.json()
    assert st == {"group": "g0", "state": "ready", "inflight": 3, "num_running": 2, "num_waiting": 1,
                  "kv_cache_usage": 0.25, "num_finished": 7, "num_aborted": 1, "num_free_blocks": 30,
                  "num_kv_blocks": 40}


def test_local_operator_sees_everything_without_keys(tokenizer):
    """A loopback client is the operator on the machine (what `serve run` on 127.0.0.1 serves); a proxy on the same
    host forwarding someone else's request is not."""
    with _client(tokenizer, {}, client=("127.0.0.1", 40000)) as c:
        assert c.get("/v1/k2ray/layout").json() == LAYOUT
        assert c.get("/v1/k2ray/stats").json() == STATS
        for h in ({"X-Forwarded-For": "198.51.100.4"}, {"Forwarded": "for=198.51.100.4"}):
            assert "pid" not in c.get("/v1/k2ray/layout", headers=h).text
            assert "error" not in c.get("/v1/k2ray/stats", headers=h).json()
    with _client(tokenizer, {}, client=("::1", 40000)) as c:
        assert c.get("/v1/k2ray/layout").json() == LAYOUT


def test_resize_is_an_admin_action(tokenizer):
    """POST /v1/k2ray/resize takes the pool sizes as JSON; it needs the key (or a local client with keys off); a size
    outside the range, or of the wrong type, is a 400 naming the field."""
    auth = {"Authorization": "Bearer sk-1"}
    with _client(tokenizer, {"api_keys": ["sk-1"]}) as c:
        assert c.post("/v1/k2ray/resize", json={"expert_shards": 3}).status_code == 401
        r = c.post("/v1/k2ray/resize", json={"expert_shards": 3}, headers=auth)
        assert r.status_code == 200 and r.json()["started"] and r.json()["to"]["expert_shards"] == 3
        assert_openai_error(c.post("/v1/k2ray/resize", json={"expert_shards": 9}, headers=auth), 400,
                            "invalid_value", "expert_shards")
        assert_openai_error(c.post("/v1/k2ray/resize", json={"expert_shards": "3"}, headers=auth), 400)
        assert_openai_error(c.post("/v1/k2ray/resize", json={"shards": 3}, headers=auth), 400)
    with _client(tokenizer, {}) as c:  # keys off, a remote client
        r = c.post("/v1/k2ray/resize", json={"expert_shards": 3})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    with _client(tokenizer, {}, client=("127.0.0.1", 40000)) as c:
        assert c.post("/v1/k2ray/resize", json={"attention_workers": 1}).json()["started"]


def test_rebalance_is_an_admin_action(tokenizer):
    """POST /v1/k2ray/rebalance answers the predicted balancedness before and after; it needs the key when keys are
    on, and a local client when they are off."""
    with _client(tokenizer, {"api_keys": ["sk-1"]}) as c:
        assert c.post("/v1/k2ray/rebalance").status_code == 401
        r = c.post("/v1/k2ray/rebalance", headers={"Authorization": "Bearer sk-1"})
        assert r.status_code == 200 and r.json() == REBALANCE
        assert c.get("/v1/k2ray/rebalance", headers={"Authorization": "Bearer sk-1"}).status_code == 405
    with _client(tokenizer, {}) as c:  # keys off, a remote client
        r = c.post("/v1/k2ray/rebalance")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    with _client(tokenizer, {}, client=("127.0.0.1", 40000)) as c:
        assert c.post("/v1/k2ray/rebalance").json()["new_balancedness"] == 0.99
        assert c.post("/v1/k2ray/rebalance", headers={"X-Forwarded-For": "198.51.100.4"}).status_code == 403
