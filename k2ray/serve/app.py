"""``build_app(args)``: the k2ray Ray Serve application (``import_path: k2ray.serve.app:build_app``).

Two deployments (three with an image encoder pool):

* ``OpenAIIngress`` — FastAPI, CPU only, autoscaled on ongoing requests.
* ``VisionEncoder`` — only with ``vision_workers`` > 0 (Kimi K2.5): the image encoder pool, shared by the model
  groups (``k2ray/workers/vision.py``).
* ``K2Router`` — one replica per model group. Its placement group (``placement_group_bundles``) is bundle 0 for the
  replica itself (``router_cpus`` / ``router_gpus``) followed by one bundle per attention worker and one per expert
  shard (GPUs/CPUs per bundle from ``parallel``); the replica starts the workers inside it. Autoscaling this
  deployment adds or removes whole model groups.

``args`` is validated as :class:`k2ray.serve.config.ServeArgs`. Deployment options set here are defaults: the deploy file's
``deployments:`` section overrides them (autoscaling, ``max_ongoing_requests``, ...). Keep a ``K2Router``
``ray_actor_options.num_cpus`` override at or below ``args.router_cpus``, which sizes bundle 0.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from k2ray.serve.config import ServeArgs
from k2ray.serve.ingress import OpenAIIngress
from k2ray.serve.router import K2Router
from k2ray.workers.vision import VisionEncoder

__all__ = ["build_app", "build_app_with_options", "router_bundles", "router_options", "IngressDeployment", "RouterDeployment"]

# The FastAPI app is built in each replica (OpenAIIngress.__serve_build_asgi_app__), never pickled.
IngressDeployment = serve.deployment(name="OpenAIIngress")(serve.ingress()(OpenAIIngress))
RouterDeployment = serve.deployment(name="K2Router")(K2Router)
VisionDeployment = serve.deployment(name="VisionEncoder")(VisionEncoder)


def _worker_bundles(args: ServeArgs) -> list[dict[str, float]]:
    """One bundle per attention worker, then per expert shard (per-pool resources; an empty bundle gets a sliver of
    CPU, since Ray refuses empty bundles)."""
    return [dict(b) or {"CPU": 0.01} for b in args.parallel.bundles()]


def router_bundles(args: ServeArgs) -> list[dict[str, float]]:
    """The placement group of one model group: the router replica, then its attention workers and expert shards."""
    first: dict[str, float] = {"CPU": args.router_cpus} if args.router_cpus else {"CPU": 0.01}
    if args.router_gpus:
        first["GPU"] = args.router_gpus
    if args.parallel.executor != "ray":
        return [first]
    return [first] + _worker_bundles(args)


def router_options(args: ServeArgs) -> dict[str, Any]:
    """Default Serve options of the K2Router deployment for these args."""
    p = args.parallel
    bundles = router_bundles(args)
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": bundles[0]["CPU"], "num_gpus": bundles[0].get("GPU", 0)},
        "placement_group_bundles": bundles,
        "placement_group_strategy": p.placement_strategy,
        # Admit everything the engine may hold (running + its own bounded queue); the router answers 503 beyond
        # max_queued_requests. Serve's own queue in front of the replicas is bounded too, but as large as a
        # replica's admission: a burst waits there only while the handle assigns it (a smaller bound rejected
        # requests of a 32-client burst the engine had room for).
        "max_ongoing_requests": args.group_capacity + 8,
        "max_queued_requests": args.group_capacity + 8,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": 30.0,
    }
    selectors = p.bundle_label_selectors() if p.executor == "ray" else []
    if any(selectors):
        opts["placement_group_bundle_label_selector"] = [{}] + selectors
    return opts


def vision_options(args: ServeArgs) -> dict[str, Any]:
    """Serve options of the VisionEncoder deployment: a fixed pool, or one Serve autoscales on its own queue."""
    actor: dict[str, Any] = {"num_cpus": args.vision_worker_cpus, "num_gpus": args.vision_worker_gpus}
    if args.vision_worker_resources:
        actor["resources"] = dict(args.vision_worker_resources)
    if args.vision_worker_node_labels:
        actor["label_selector"] = dict(args.vision_worker_node_labels)
    opts: dict[str, Any] = {"ray_actor_options": actor,
                            "max_ongoing_requests": 4 * args.group_capacity}
    if args.vision_max_workers > args.vision_workers:
        opts["autoscaling_config"] = {"min_replicas": args.vision_workers, "max_replicas": args.vision_max_workers,
                                      "target_ongoing_requests": args.vision_target_ongoing_requests}
    else:
        opts["num_replicas"] = args.vision_workers
    return opts


def build_app(args: dict[str, Any] | ServeArgs | None = None):
    """The k2ray application for ``serve run`` / ``serve deploy`` / ``serve.run`` (Serve wants a builder of exactly
    one parameter)."""
    return build_app_with_options(args)


def build_app_with_options(args: dict[str, Any] | ServeArgs | None = None,
                           ingress_options: dict[str, Any] | None = None):
    """:func:`build_app`, with Serve options of the OpenAIIngress deployment over its defaults (e.g.
    ``{"num_replicas": 2}``, as a deploy file's ``deployments:`` section would set them)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    plain = a.model_dump(mode="json")
    vision = None
    if a.vision_workers:
        # One pool for the whole application: every model group's router gets the same handle.
        vision = VisionDeployment.options(**vision_options(a)).bind(
            a.model, a.model_name, a.engine.dtype, "cuda" if a.vision_worker_gpus else "cpu", a.vision_cache_images,
            max(1, int(a.vision_worker_cpus)), a.vision_max_batch_requests, a.vision_batch_wait_ms / 1e3)
    router = RouterDeployment.options(**router_options(a)).bind(plain, vision)
    ingress = IngressDeployment.options(**{
        "ray_actor_options": {"num_cpus": 0.25},
        # Room for more than the groups hold, so the ingress's own admission (serve/admission.py) answers an
        # overload at once instead of Serve queueing it in front of the replica.
        "max_ongoing_requests": max(256, 4 * (a.max_queued_requests + a.engine.max_num_seqs)),
        "max_queued_requests": max(512, 8 * (a.max_queued_requests + a.engine.max_num_seqs)),
        **(ingress_options or {}),
    }).bind(router, plain)
    return ingress
