"""The refit's training against scikit-learn's on equal terms: the same 5 configurations of the bench_search
space (hidden, lr, epochs, batch) trained by ``MLPClassifier`` (StandardScaler + Adam) and by optiflow on the
same train/test split of digits (bench_search's), seeds 0-2; prints each and the mean test accuracies.

    python benchmarks/same_config_accuracy.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

CONFIGS = [(128, 0.01, 30, 64), (200, 0.001, 40, 100), (64, 0.01, 20, 50), (150, 0.1, 25, 80), (240, 0.001, 15, 40)]


def main() -> None:
    from bench_search import split_indices
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from optiflow.commands.train import train
    from optiflow.config import RunConfig

    warnings.filterwarnings("ignore")
    x, y = load_digits(return_X_y=True)
    uri = f"sqlite:///{tempfile.mkdtemp(prefix='optiflow-same-config-')}/mlflow.db"
    scores: dict[str, list[float]] = {"sklearn": [], "optiflow": []}
    for seed in range(3):
        train_index, test_index = split_indices(seed)
        for hidden, lr, epochs, batch in CONFIGS:
            model = make_pipeline(StandardScaler(), MLPClassifier(
                hidden_layer_sizes=(hidden,), learning_rate_init=lr, max_iter=epochs, batch_size=batch,
                random_state=seed))
            model.fit(x[train_index], y[train_index])
            scores["sklearn"].append(float(model.score(x[test_index], y[test_index])))
            config = RunConfig.from_dict({"model": f"mlp:hidden=[{hidden}]", "opt": f"adam:lr={lr}", "epochs": epochs,
                                          "batch_size": batch, "seed": seed, "val_split": 0, "tracking_uri": uri,
                                          "experiment": "same-config"})
            scores["optiflow"].append(train(config, log_model=False, artifacts=False).metrics["test_accuracy"])
            print(f"seed {seed} hidden {hidden} lr {lr} epochs {epochs} batch {batch}: "
                  f"sklearn {scores['sklearn'][-1]:.4f}  optiflow {scores['optiflow'][-1]:.4f}", flush=True)
    print("mean test accuracy: " + "  ".join(f"{side} {statistics.fmean(values):.4f}" for side, values in scores.items()))


if __name__ == "__main__":
    main()
