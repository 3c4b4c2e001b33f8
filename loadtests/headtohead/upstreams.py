"""The overhead part's upstreams: nginx answering a fixed chat completion on two ports (each router
gets two backends), and a small SSE server streaming N chunks at a fixed interval.

Both also answer what the routers ask workers at start-up and per request (/v1/models, /metrics,
/health, vLLM's render and /tokenize, SGLang's /v1/loads), so every router runs its routing.
"""
from __future__ import annotations

import json
from pathlib import Path

MODEL = "bench-model"
PROMPT_IDS = list(range(100, 127))
RENDER = json.dumps({"request_id": "r", "token_ids": PROMPT_IDS, "features": None,
                     "sampling_params": {"n": 1, "max_tokens": 16}, "model": MODEL, "stream": False,
                     "stream_options": None, "cache_salt": None, "priority": 0, "kv_transfer_params": None},
                    separators=(",", ":"))
TOKENIZE = json.dumps({"count": len(PROMPT_IDS), "max_model_len": 8192, "tokens": PROMPT_IDS, "token_strs": None},
                      separators=(",", ":"))

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port_a} reuseport backlog=4096;
        listen 127.0.0.1:{port_b} reuseport backlog=4096;
        default_type application/json;
        location = /v1/chat/completions {{ return 200 '{completion}'; }}
        location = /v1/chat/completions/render {{ return 200 '{render}'; }}
        location = /tokenize {{ return 200 '{tokenize}'; }}
        location = /v1/models {{ return 200 '{models}'; }}
        location = /metrics {{ default_type "text/plain; version=0.0.4"; return 200 '{metrics}'; }}
        location = /health {{ return 200 '{{}}'; }}
        location = /version {{ return 200 '{{"version":"0.0.0"}}'; }}
        location / {{ return 404 '{{"error":{{"message":"not found","type":"NotFoundError","param":null,"code":404}}}}'; }}
    }}
}}
"""


def nginx_conf(tmp: Path, port_a: int, port_b: int, completion: str, models: str, metrics: str) -> str:
    return NGINX_CONF.format(tmp=tmp, port_a=port_a, port_b=port_b, completion=completion, render=RENDER,
                             tokenize=TOKENIZE, models=models, metrics=metrics)
