"""A Flask app whose start is expensive: at import it builds a large in-memory "model".

The model is a stand-in for loading real weights: computing 240,000 floats and a vocabulary
dict in Python takes a few seconds under TCG, and the weights are then tiled into a 30 MB
table, the large in-memory object a real model would be. Under microvm-edge that import runs once, while the
template boots; every VM cloned from the template starts with the model already in memory.

/var/lib/flask-app/init-count counts the inits that ran on this disk, and `GET /` shows it:
a clone answers 1, because it never runs the init itself.
"""

from __future__ import annotations

import array
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

STATE = Path(os.environ.get("FLASK_APP_STATE", "/var/lib/flask-app"))
ROWS = int(os.environ.get("MODEL_ROWS", "30000"))
WIDTH = 8
TILES = 16


def load_model() -> dict[str, Any]:
    """The expensive part: weights, a vocabulary, and a checksum over the weights."""
    started = time.monotonic()
    weights = array.array("d", (math.sin(i * 0.001) for i in range(ROWS * WIDTH)))
    vocab = {f"token-{i}": i for i in range(ROWS)}
    table = weights * TILES
    digest = hashlib.sha256(table).hexdigest()[:16]
    count_file = STATE / "init-count"
    count = int(count_file.read_text()) + 1 if count_file.exists() else 1
    count_file.write_text(f"{count}\n")
    seconds = time.monotonic() - started
    print(f"flask-app: model loaded in {seconds:.2f} s ({ROWS} rows, init #{count})", flush=True)
    return {"weights": weights, "table": table, "vocab": vocab, "digest": digest, "seconds": seconds,
            "pid": os.getpid()}  # fmt: skip


MODEL = load_model()
STARTED_AT = time.time()
app = Flask(__name__)
requests_served = 0


@app.get("/")
def index() -> Any:
    global requests_served
    requests_served += 1
    return jsonify(
        init_count=int((STATE / "init-count").read_text()),
        init_seconds=round(MODEL["seconds"], 3),
        init_pid=MODEL["pid"],
        model={"rows": ROWS, "bytes": MODEL["table"].itemsize * len(MODEL["table"]), "digest": MODEL["digest"]},
        pid=os.getpid(),
        started_at=STARTED_AT,
        requests=requests_served,
    )


@app.get("/predict")
def predict() -> Any:
    """A score for ?token=token-<n>: the dot product of its row with the first row."""
    row = MODEL["vocab"].get(request.args.get("token", ""))
    if row is None:
        return jsonify(error="unknown token"), 404
    weights = MODEL["weights"]
    score = sum(weights[row * WIDTH + k] * weights[k] for k in range(WIDTH))
    return jsonify(token=request.args["token"], score=score)
