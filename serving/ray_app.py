"""The OpenAI routes of openai_api.py as a Ray Serve application: N replicas, each loading the model and running
its own engine, Ray's proxy in front spreading requests over them and Ray's controller replacing a replica that
dies. Ray is an optional extra: `pip install -r requirements-ray.txt`.

    python -m serving.ray_app --replicas 2 --model-path /path/to/chatglm3-6b     # a local Ray cluster, started here
    serve run serving/ray_serve.yaml                                              # the same from Ray's own CLI
    python -m serving.ray_app --address auto ...                                  # on a cluster from `ray start`

Each replica answers what openai_api.py answers (same app, same limits) and says which replica it is in the
`x-chatglm-replica` header. A request running on a replica that dies gets an error from Ray's proxy (a 5xx, or
its stream cut short), never a hang: the controller starts a new replica in its place, and the next requests go
to the live ones. Ray's usage statistics are off unless RAY_USAGE_STATS_ENABLED says otherwise; the proxy binds
127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry unless asked: before ray is imported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLICA_HEADER = b"x-chatglm-replica"
# What an app builder takes (serve run / the config file's `args`): the model flags of utils.add_model_args, by
# their dest, and these.
APP_OPTIONS = {"replicas": 2, "cpus_per_replica": 1.0, "gpus_per_replica": 0.0, "max_batch": 8, "max_waiting": 64,
               "model_name": None, "api_key": None, "max_ongoing_requests": 64}  # fmt: skip


def _model_args(options: dict) -> argparse.Namespace:
    """utils.add_model_args' namespace (their environment defaults) with `options` set."""
    from utils import add_model_args

    args = add_model_args(argparse.ArgumentParser()).parse_args([])
    for key, value in options.items():
        if not hasattr(args, key):
            raise ValueError(f"unknown option {key!r} for the ChatGLM Ray Serve app")
        setattr(args, key, value)
    return args


def replica_app(model_options: dict, options: dict):
    """The ASGI app of one replica (built on the replica): openai_api.py's app on the model, tagged with the
    replica's id."""
    from ray import serve

    from utils import load_from_args

    from .openai_api import create_app

    model, tokenizer = load_from_args(_model_args(model_options))
    app = create_app(model, tokenizer, options["model_name"], max_waiting=options["max_waiting"],
                     max_batch=options["max_batch"], api_key=options["api_key"])  # fmt: skip
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001  (outside a replica: tests, local testing mode)
        replica = f"pid-{os.getpid()}"
    return _Tagged(app, replica.encode())


class _Tagged:
    """ASGI middleware adding the replica header to every response."""

    def __init__(self, app, tag: bytes):
        self.app, self.tag = app, tag

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (REPLICA_HEADER, self.tag)])
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def build_app(args: dict | None = None):
    """A Ray Serve Application (`serve run serving.ray_app:build_app replicas=2 model_path=...`, or the config
    file's import_path). `args`: APP_OPTIONS and utils.add_model_args' options by their dest (model_path, quantize,
    dtype, lora, ...)."""
    from ray import serve

    args = dict(args or {})
    options = {k: args.pop(k, v) for k, v in APP_OPTIONS.items()}
    _model_args(args)  # an unknown option fails here, not on every replica
    replicas = int(options["replicas"])
    if replicas < 1:
        raise ValueError("replicas must be at least 1")

    class ChatGLMReplica:
        """One replica: the ASGI app built by replica_app."""

    ingress = serve.ingress(lambda: replica_app(args, options))(ChatGLMReplica)
    deployment = serve.deployment(
        ingress,
        name="chatglm",
        num_replicas=replicas,
        max_ongoing_requests=int(options["max_ongoing_requests"]),
        ray_actor_options={
            "num_cpus": float(options["cpus_per_replica"]),
            "num_gpus": float(options["gpus_per_replica"]),
            # the repository on the replicas' path (on a cluster: the same checkout on each node)
            "runtime_env": {"env_vars": {"PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"}},
        },  # fmt: skip
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    return deployment.bind()


def main(argv=None) -> None:
    from utils import add_model_args

    parser = argparse.ArgumentParser(prog="python -m serving.ray_app", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    g = parser.add_argument_group("Ray Serve")
    g.add_argument("--replicas", type=int, default=2, help="replicas of the model (default 2)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray gives each replica (default 1)")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs Ray gives each replica (default 0)")
    g.add_argument("--address", default=None, help="a Ray cluster to join ('auto': the one `ray start` made); "
                   "default: start a local one")  # fmt: skip
    g.add_argument("--host", default="127.0.0.1", help="address Ray's HTTP proxy binds (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="its port (default 8000)")
    g.add_argument("--max-batch", type=int, default=8, help="requests batched together by each replica's engine")
    g.add_argument("--max-waiting", type=int, default=64, help="more requests waiting per replica; then 503")
    g.add_argument("--model-name", default=None, help="model id in /v1/models (default: chatglmN-6b)")
    g.add_argument("--api-key", default=os.environ.get("CHATGLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: CHATGLM_API_KEY)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: Ray Serve is not installed: pip install -r requirements-ray.txt", file=sys.stderr)
        raise SystemExit(2) from None
    model_keys = vars(_model_args({}))
    model_options = {k: v for k, v in vars(args).items() if k in model_keys}
    app_options = {"replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
                   "gpus_per_replica": args.gpus_per_replica, "max_batch": args.max_batch,
                   "max_waiting": args.max_waiting, "model_name": args.model_name, "api_key": args.api_key}  # fmt: skip
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({**model_options, **app_options}), name="chatglm", route_prefix="/", blocking=False)
    print(f"ChatGLM on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}/v1 (Ctrl+C stops)",
          flush=True)  # fmt: skip
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
