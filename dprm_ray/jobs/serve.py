"""`dprm-ray serve --model DIR`: serve a reward model over HTTP with Ray Serve.

`POST /score` with `{"items": [{"prompt": ..., "response": ...}, ...]}` returns, per item, the
predicted distribution (null for Bradley-Terry models), the expected reward and its variance, plus
the label names; `GET /healthz` says the model is loaded (both under `route`). Requests are batched
across clients, at most `max_batch_size` items per forward pass. With `token_env=NAME` every
`/score` request needs `Authorization: Bearer $NAME`. Binds 127.0.0.1 unless `host` says otherwise.
Runs until Ctrl-C or SIGTERM (or `duration_s`), then shuts its Serve application down.

`build_app` builds the same application for a Ray Serve config file, e.g. a KubeRay RayService's
`serveConfigV2` (`import_path: dprm_ray.jobs.serve:build_app`, `args:` the app's config keys;
cluster/rayservice-reward.yaml).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dprm_ray.config import MISSING, ConfigError, load_config, validate_config
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "dprm-ray-reward"


@dataclass
class AutoscalingConfig:
    enabled: bool = field(default=False, metadata={"help": "autoscale instead of num_replicas"})
    min_replicas: int = field(default=1, metadata={"min": 0})
    max_replicas: int = field(default=2, metadata={"min": 1})
    target_ongoing_requests: float = field(
        default=8.0,
        metadata={"above": 0, "help": "ongoing requests per replica the autoscaler aims for"},
    )


@dataclass
class ServeConfig:
    model: str = field(default=MISSING, metadata={"help": "reward-model folder (train-reward)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP proxy binds"})
    port: int = field(default=8000, metadata={"min": 0, "max": 65535})
    route: str = field(default="/", metadata={"help": "route prefix of /score and /healthz"})
    num_replicas: int = field(default=1, metadata={"min": 1})
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = field(
        default=64, metadata={"min": 1, "help": "requests a replica holds at once (queued beyond)"}
    )
    max_batch_size: int = field(
        default=64, metadata={"min": 1, "help": "items per forward pass (>= max_items_per_request)"}
    )
    batch_wait_timeout_s: float = field(
        default=0.005, metadata={"min": 0, "help": "how long a batch waits to fill up"}
    )
    max_items_per_request: int = field(default=64, metadata={"min": 1, "help": "more: 413"})
    max_body_bytes: int = field(default=1 << 20, metadata={"min": 1, "help": "larger bodies: 413"})
    max_length: int = field(default=512, metadata={"min": 1, "help": "tokens per item (truncated)"})
    token_env: str = field(
        default="", metadata={"help": "env var holding the bearer token ('' = no auth)"}
    )
    cpus_per_replica: float = field(default=1.0, metadata={"min": 0})
    duration_s: float = field(
        default=0.0,
        metadata={"min": 0, "help": "stop after this many seconds (0 = until Ctrl-C/SIGTERM)"},
    )
    address: str = field(default="", metadata={"help": "Ray address ('' = local or the job's)"})
    output_dir: str = "outputs/serve"

    def validate(self) -> None:
        """Config problems that need no Ray, each naming its key (the runner calls it)."""
        from dprm_ray.reward_models import is_reward_model_dir

        if not is_reward_model_dir(self.model):
            raise ConfigError(
                f"model: '{self.model}' is not a reward-model folder "
                "(no reward_model.json, nor an HF config.json with dprm_reward_type)"
            )
        if not self.route.startswith("/"):
            raise ConfigError(f"route: must start with '/', got '{self.route}'")
        for key in (
            "max_items_per_request",
            "max_batch_size",
            "max_ongoing_requests",
            "max_length",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_batch_size < self.max_items_per_request:
            raise ConfigError(
                f"max_batch_size: {self.max_batch_size} items per forward pass is less than "
                f"max_items_per_request ({self.max_items_per_request}); a full request must fit"
            )
        if self.max_body_bytes < 2:
            raise ConfigError(f"max_body_bytes: must be >= 2, got {self.max_body_bytes}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: must be in 0..65535, got {self.port}")
        scaling = self.autoscaling
        if scaling.enabled and not 0 <= scaling.min_replicas <= scaling.max_replicas:
            raise ConfigError(
                "autoscaling: need 0 <= min_replicas <= max_replicas, got "
                f"{scaling.min_replicas} and {scaling.max_replicas}"
            )
        if not scaling.enabled and self.num_replicas < 1:
            raise ConfigError(f"num_replicas: must be >= 1, got {self.num_replicas}")


def bearer_token(cfg: ServeConfig) -> str | None:
    if not cfg.token_env:
        return None
    token = os.environ.get(cfg.token_env, "").strip()
    if not token:
        raise ConfigError(f"token_env: environment variable '{cfg.token_env}' is not set or empty")
    return token


def base_url(cfg: ServeConfig, port: int | None = None) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return f"http://{host}:{port or cfg.port}{cfg.route.rstrip('/')}"


def reward_app(cfg: ServeConfig, token: str | None) -> Application:
    """The scorer deployment, bound to its arguments: the application `deploy` runs and
    `build_app` returns. Builds only; loading the model is the replicas' work."""
    from dprm_ray.actors.serve import RewardScorer
    from dprm_ray.serving import token_digest

    options: dict = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica},
    }
    if cfg.autoscaling.enabled:
        options["autoscaling_config"] = {
            "min_replicas": cfg.autoscaling.min_replicas,
            "max_replicas": cfg.autoscaling.max_replicas,
            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return RewardScorer.options(**options).bind(
        str(Path(cfg.model).resolve()),
        cfg.max_length,
        cfg.max_items_per_request,
        cfg.max_body_bytes,
        cfg.max_batch_size,
        cfg.batch_wait_timeout_s,
        token_digest(token) if token else None,
    )


# ServeConfig keys of the `dprm-ray serve` process, not of the application, and why.
NOT_APP_ARGS = {
    "host": "the proxy's host is http_options.host of the Serve config",
    "port": "the proxy's port is http_options.port of the Serve config",
    "route": "the route is the application's route_prefix in the Serve config",
    "duration_s": "an application runs until it is deleted",
    "address": "an application runs on the cluster that reads the Serve config",
    "output_dir": "the application writes no files",
}


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: `import_path: dprm_ray.jobs.serve:build_app` in a Serve
    config file (`serve deploy`, a KubeRay RayService's serveConfigV2). `args` are the
    application's ServeConfig keys (model, num_replicas, autoscaling, max_batch_size, token_env,
    ...), checked as the serve job checks them (ConfigError naming the key); with `token_env`
    the variable must be set where Serve builds the application."""
    misplaced = sorted(set(args) & set(NOT_APP_ARGS))
    if misplaced:
        key = misplaced[0]
        raise ConfigError(f"args.{key}: not an application setting ({NOT_APP_ARGS[key]})")
    cfg = load_config(ServeConfig, values=args, values_source="args")
    validate_config(cfg)
    return reward_app(cfg, bearer_token(cfg))


def deploy(cfg: ServeConfig, token: str | None) -> str:
    """Start Serve (HTTP on cfg.host:cfg.port) with the scorer app on the connected Ray cluster.

    Returns the base URL once `/healthz` answers.
    """
    from ray import serve

    validate_config(cfg)  # deploy is also called on its own
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(reward_app(cfg, token), name=APP_NAME, route_prefix=cfg.route)
    url = base_url(cfg)
    _wait_healthy(url + "/healthz", timeout_s=120.0)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    """serve.run returns once replicas are up; the proxy may take a moment longer to route."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


def run(cfg: ServeConfig) -> dict:
    import ray
    from ray import serve

    token = bearer_token(cfg)
    own_cluster = not cfg.address and "RAY_ADDRESS" not in os.environ
    init_ray(cfg.address, cfg.output_dir)
    stop = threading.Event()
    # Ctrl-C and SIGTERM both end the wait below, so the app is always taken down. Installed
    # after ray.init, which sets a SIGTERM handler of its own (sys.exit).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start = time.perf_counter()
    try:
        url = deploy(cfg, token)
        auth = f" (bearer token from ${cfg.token_env})" if token else ""
        print(f"serving {cfg.model} at {url}/score{auth}; health: {url}/healthz", flush=True)
        deadline = time.monotonic() + cfg.duration_s if cfg.duration_s > 0 else float("inf")
        while not stop.wait(0.5) and time.monotonic() < deadline:
            pass
    finally:
        served = time.perf_counter() - start
        # On a cluster we joined, remove only our app; Serve itself may be serving others.
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return {"url": url, "served_s": round(served, 3)}


JOB = Job(
    "serve",
    "Serve a reward model over HTTP with Ray Serve (/score, /healthz).",
    (Command("", __doc__.strip(), ServeConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())
