"""Flower's FedAvg aggregation (anchors venv), one fresh process per run.

Methods (spec "method"):

  flower          flwr.server.strategy.aggregate.aggregate(results), results being
                  [(list of numpy arrays, num_examples), ...] -- the list-of-ndarrays
                  weighted average (FedAvg with inplace=False).
  flower-inplace  flwr.server.strategy.aggregate.aggregate_inplace(results), results being
                  [(client_proxy, FitRes), ...] with each client's weights serialized into
                  FitRes.parameters by flwr.common.ndarrays_to_parameters, as they arrive
                  from clients -- what flwr's FedAvg strategy runs by default. The call
                  deserializes each client's parameters itself (that is part of its time).

Inputs are the clients' full local weights (anchor_data), built before the timer; only the
aggregate call is timed. The result (new global weights) goes to spec "out".
"""

from __future__ import annotations

import sys
from typing import Any

import flwr
import numpy as np
from anchor_data import full_local_weights, load_base, save_result
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
from runner_common import emit, load_spec, measure


def main() -> None:
    spec = load_spec()
    method = spec["method"]
    base = load_base(spec)
    names = list(base)
    if method == "flower":
        results: list[tuple[list[np.ndarray], int]] = [
            ([local[name] for name in names], n) for n, local in full_local_weights(spec, base)
        ]
        del base
        weights, measurement = measure(lambda: aggregate(results), warmups=spec.get("warmup", 0))
    elif method == "flower-inplace":
        fit_results: list[tuple[Any, FitRes]] = []
        for n, local in full_local_weights(spec, base):
            parameters = ndarrays_to_parameters([local[name] for name in names])
            del local
            status = Status(code=Code.OK, message="Success")
            # aggregate_inplace never looks at the ClientProxy (the first item of each pair).
            fit_results.append(
                (None, FitRes(status=status, parameters=parameters, num_examples=n, metrics={}))
            )
        del base
        weights, measurement = measure(lambda: aggregate_inplace(fit_results), warmups=spec.get("warmup", 0))
    else:
        sys.exit(f"unknown method {method!r}")
    save_result(spec["out"], dict(zip(names, weights, strict=True)))
    emit(method, measurement, {"flwr": flwr.__version__, "numpy": np.__version__})


if __name__ == "__main__":
    main()
