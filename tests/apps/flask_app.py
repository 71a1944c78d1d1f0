"""A Flask app that reports the request body it received (tests/test_frameworks.py)."""

import hashlib

from flask import Flask, request

app = Flask(__name__)


@app.route("/upload", methods=["POST"])
def upload():
    data = request.get_data()
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
