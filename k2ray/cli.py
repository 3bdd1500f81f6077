"""The ``k2ray`` command.

Each subcommand is a pair of functions — ``add_arguments(parser)`` and ``run(args) -> int`` — registered in
:data:`COMMANDS` (or with :func:`register`), so other modules can add subcommands without touching ``main``. Expected
failures (bad arguments, invalid model directories, ...) print one ``k2ray: error: ...`` line and exit with status 1;
set ``K2RAY_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    COMMANDS[name] = Command(name, help, add_arguments, run)


# -- make-tiny ---------------------------------------------------------------------------------------------------------
def _make_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0); same seed, same bytes")
    p.add_argument("--preset", choices=["tiny", "k2-mini"], default="tiny",
                   help="tiny (default: 4 small layers, 32 experts, 2304-token vocabulary) or k2-mini (Kimi K2's real "
                        "layer shapes and 163,840-token vocabulary, 3 layers of which 2 MoE with 384 INT4 experts: "
                        "about 25 GB, written shard by shard)")
    p.add_argument("--format", choices=("kimi_k2", "kimi_k25"), default="kimi_k2",
                   help="kimi_k2: the K2-Thinking layout (default); kimi_k25: the K2.5 layout with a tiny image "
                        "encoder (MoonViT), its preprocessor config and an image-aware chat template")


def _make_tiny_run(args: argparse.Namespace) -> int:
    from k2ray.checkpoint.tiny import make_preset, make_tiny

    if args.format != "kimi_k2" and args.preset != "tiny":
        raise SystemExit(f"k2ray make-tiny: --format {args.format} is only available with --preset tiny")
    if args.preset == "tiny":
        out = make_tiny(args.dir, seed=args.seed, format=args.format)
        print(f"wrote tiny {'K2.5' if args.format == 'kimi_k25' else 'K2'} checkpoint to {out}")
    else:
        out = make_preset(args.dir, preset=args.preset, seed=args.seed)
        print(f"wrote {args.preset} K2 checkpoint to {out}")
    return 0


# -- generate ----------------------------------------------------------------------------------------------------------
def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return n


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model directory (e.g. from `k2ray make-tiny`) or a built-in name: k2ray-demo, k2ray-tiny")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for several prompts (batched together)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the chat template; print reasoning, content and "
                        "tool calls")
    p.add_argument("--tools", help="with --chat: the tools to declare, a JSON list (OpenAI format) or @FILE")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: chat_template_kwargs thinking=false")
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=_positive_int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--attention-workers", type=_positive_int, default=1)
    p.add_argument("--expert-shards", type=_positive_int, default=1)
    p.add_argument("--show-tokens", action="store_true", help="also print the generated token ids")


def _generate_run(args: argparse.Namespace) -> int:
    from k2ray.runtime.sampling import SamplingParams
    from k2ray.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, n=args.n, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    tools = _load_tools(args.tools) if args.tools else None
    if (tools or args.no_thinking) and not args.chat:
        raise ValueError("--tools and --no-thinking need --chat")
    llm = LLM(args.model, dtype=args.dtype, executor=args.executor, attention_workers=args.attention_workers,
              expert_shards=args.expert_shards)
    try:
        if args.chat:
            chats = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, tools=tools,
                             chat_template_kwargs={"thinking": False} if args.no_thinking else None)
            _print_chats(chats, args)
            return 0
        results = llm.generate(args.prompt, params)
    finally:
        llm.shutdown()
    many = len(results) > 1 or args.n > 1
    for res in results:
        for out in res.outputs:
            if many:
                print(f"--- prompt {results.index(res)} completion {out.index} ({out.finish_reason})")
            print(res.prompt + out.text if not many else out.text)
            if args.show_tokens:
                print(f"token_ids: {out.token_ids}")
            if not many:  # on stderr, so the text alone can be piped
                _print_finish(out.finish_reason, len(out.token_ids))
    return 0


def _print_finish(reason: Optional[str], n_tokens: int) -> None:
    hint = " (raise --max-tokens for more)" if reason == "length" else ""
    print(f"[finish_reason: {reason}, {n_tokens} tokens{hint}]", file=sys.stderr)


def _load_tools(spec: str) -> list:
    import json

    where = "--tools"
    if spec.startswith("@"):
        where = spec[1:]
        try:
            spec = open(where, encoding="utf-8").read()
        except OSError as e:
            raise ValueError(f"--tools: cannot read {where}: {e.strerror}") from None
    try:
        tools = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: expected a JSON list of tools ({{\"type\": \"function\", \"function\": ...}})")
    return tools


def _print_chats(chats, args: argparse.Namespace) -> None:
    many = len(chats) > 1 or args.n > 1
    for i, chat in enumerate(chats):
        for j, (msg, reason) in enumerate(zip(chat.messages, chat.finish_reasons)):
            if many:
                print(f"--- prompt {i} completion {j} ({reason})")
            if msg.get("reasoning_content"):
                print(f"[reasoning] {msg['reasoning_content']}")
            if msg.get("content"):
                print(msg["content"])
            for call in msg.get("tool_calls", []):
                fn = call["function"]
                print(f"[tool call {call['id']}] {fn['name']} {fn['arguments']}")
            if args.show_tokens:
                print(f"token_ids: {chat.output.outputs[j].token_ids}")
            if not many:
                _print_finish(reason, len(chat.output.outputs[j].token_ids))


register("make-tiny", "write the tiny random-weight K2-format checkpoint", _make_tiny_args, _make_tiny_run)
register("generate", "generate text with the offline engine", _generate_args, _generate_run)


# -- train-demo --------------------------------------------------------------------------------------------------------
_TRAIN_DEMO_OPTIONS = {  # k2ray.demo.train's options (defaults live there)
    "--out": "checkpoint directory (default: the shipped k2ray/assets/k2ray-demo)",
    "--seed": "seed of corpus, initialization and batches (default 0)",
    "--dialogs": "training dialogues",
    "--steps": "optimizer steps",
    "--batch-tokens": "tokens computed per step",
    "--lr": "peak learning rate",
    "--short-frac": "first fraction of steps on the dialogues without the tool declaration (curriculum)",
    "--qat-frac": "final fraction of steps with INT4 fake quantization of the routed experts",
    "--threads": "torch CPU threads",
    "--eval-only": "evaluate this checkpoint on the held-out set and exit",
}


def _train_demo_args(p: argparse.ArgumentParser) -> None:
    for opt, help in _TRAIN_DEMO_OPTIONS.items():
        p.add_argument(opt, default=None, help=help)
    p.add_argument("--no-card", action="store_true", help="do not write the model card (README.md)")


def _train_demo_run(args: argparse.Namespace) -> int:
    from k2ray.demo.train import main

    argv = []
    for opt in _TRAIN_DEMO_OPTIONS:
        value = getattr(args, opt[2:].replace("-", "_"))
        if value is not None:
            argv += [opt, value]
    return main(argv + (["--no-card"] if args.no_card else []))


register("train-demo", "train the k2ray-demo checkpoint (k2ray/demo/)", _train_demo_args, _train_demo_run)


# -- bench serve -------------------------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    from k2ray.bench_serve import build_parser

    p.add_argument("what", choices=["serve"], help="serve: HTTP load against an OpenAI-compatible endpoint")
    build_parser(p)


def _bench_run(args: argparse.Namespace) -> int:
    from k2ray.bench_serve import run

    return run(args)


register("bench", "benchmarks (bench serve: HTTP load generator for any OpenAI-compatible server)", _bench_args,
         _bench_run)


def _one_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic ValidationError: the first problem, named
        try:
            first = errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            msg = str(first.get("msg", e)).removeprefix("Value error, ")
            return " ".join((f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg).split())
        except Exception:
            pass
    return " ".join(str(e).split()) or type(e).__name__


# -- edge --------------------------------------------------------------------------------------------------------------
def _edge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the Serve deploy file behind the edge (e.g. deploy/config.yaml): the "
                   "upstream is its http_options host:port, the in-flight cap its model groups' largest capacity")
    p.add_argument("--listen", default="0.0.0.0:8080", help="PORT or HOST:PORT the edge listens on (default "
                   "0.0.0.0:8080)")
    p.add_argument("--upstream", help="Serve's HTTP proxy, HOST:PORT (default from the deploy file, else "
                   "127.0.0.1:8000)")
    p.add_argument("--direct", help="the ingress replicas' own HTTP ports (Serve's direct ingress), HOST:FIRST-LAST, "
                   "tried before the proxy (default from the deploy file)")
    p.add_argument("--max-requests", type=int, help="generation requests in flight through the edge; more are "
                   "refused at once with 503 (default from the deploy file, else 96)")
    p.add_argument("--max-per-client", type=int, help="connections per client address (default 256)")
    p.add_argument("--header-timeout", help="time to receive a request head (default 10s)")
    p.add_argument("--body-timeout", help="time between two reads of a request body (default 10s)")
    p.add_argument("--max-body", help="largest request body, an nginx size (default from the deploy file, else 16m)")
    p.add_argument("--print-config", action="store_true", help="print the nginx configuration and exit")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _edge_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from k2ray import edge

    overrides = {"listen": args.listen, "upstream": args.upstream, "direct": args.direct, "max_requests": args.max_requests,
                 "max_per_client": args.max_per_client, "header_timeout": args.header_timeout,
                 "body_timeout": args.body_timeout, "max_body": args.max_body}
    if args.config:
        settings = edge.settings_from_deploy(Path(args.config), **overrides)
    else:
        settings = edge.EdgeSettings(**{k: v for k, v in overrides.items() if v is not None})
    if args.print_config:
        print(edge.render(settings), end="")
        return 0
    import signal

    proc = edge.start(settings)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of this command stops its nginx too
    to = f"{settings.direct} (the ingress replicas), else {settings.upstream}" if settings.direct else settings.upstream
    print(f"k2ray edge: listening on {settings.listen}, forwarding to {to}; at most "
          f"{settings.max_requests} generation requests in flight and {settings.max_per_client} connections per "
          f"client, request heads within {settings.header_timeout} (Ctrl-C stops it)", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0


register("edge", "run nginx in front of the Serve proxy: slow-client timeouts, connection caps, instant refusal",
         _edge_args, _edge_run)


# -- entry point -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2ray", description="Serve Kimi K2 on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("k2ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback
        if os.environ.get("K2RAY_DEBUG") == "1":
            raise
        msg = _one_line(e)
        print(f"k2ray: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
