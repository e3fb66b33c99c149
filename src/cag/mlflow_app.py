"""``mlflow ui --app-name cag``: MLflow's own server, opening experiments on the model-training runs table.

Why: MLflow 3.17's UI decides between its GenAI view (traces overview) and its model-training
view (runs table) from a browser-side setting, ``workflowType``: the ``?workflowType=`` URL
parameter, else the value the sidebar's "GenAI | Model training" switch stored in the browser
(``localStorage["mlflow.workflowType_v1"]``), else GenAI. The experiment tag
``mlflow.experimentKind`` is not consulted by that version's UI, so a fresh browser that clicks
a training experiment on the home page lands on an empty GenAI overview. This app is the stock
MLflow server (same store, same routes) registered under MLflow's ``mlflow.app`` plugin entry
point; it only adds one line of script to the UI's page that stores "Model training" as the
browser's choice when the browser has made none. A choice the user makes with the switch is kept.
"""

from __future__ import annotations

import json
import os
from typing import Any

WORKFLOW_KEY = "mlflow.workflowType_v1"  # MLflow's key: the setting's name and version, "<key>_v<version>"
MODEL_TRAINING = "machine_learning"
_KEY, _VALUE = json.dumps(WORKFLOW_KEY), json.dumps(json.dumps(MODEL_TRAINING))  # MLflow stores the value as JSON
_SCRIPT = f"<script>try{{if(localStorage.getItem({_KEY})===null){{localStorage.setItem({_KEY},{_VALUE})}}}}catch(e){{}}</script>"


def with_model_training_default(html: str) -> str:
    """The UI's page with the default set before MLflow's own scripts run (they read it on start)."""
    if _SCRIPT in html:
        return html
    head = html.find("<head>")
    if head < 0:
        return _SCRIPT + html
    return html[: head + len("<head>")] + _SCRIPT + html[head + len("<head>") :]


def _inject(response: Any) -> Any:
    from flask import request

    if request.endpoint != "serve" or response.status_code != 200 or response.mimetype != "text/html":
        return response  # only the UI's page (MLflow's `serve` view), never an API answer or an artifact
    response.direct_passthrough = False  # a file response: read it to rewrite it
    response.set_data(with_model_training_default(response.get_data(as_text=True)))
    return response


def create_app() -> Any:
    """The app MLflow serves for ``--app-name cag``: its Flask app (wrapped for uvicorn, as MLflow does)."""
    from mlflow.server import app as flask_app  # local: loading the server is for `mlflow ui` only

    if _inject not in flask_app.after_request_funcs.get(None, []):
        flask_app.after_request(_inject)
    if os.environ.get("_MLFLOW_SGI_NAME", "uvicorn") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app
