"""memorycore.validation: the declarative parameter check every estimator and layer uses."""

import numbers

import numpy as np
import pytest

from memorycore import InputError, NeuralMemory, RAMNet
from memorycore.validation import (FRACTION, POSITIVE, POSITIVE_INT, Interval, Options, check_params,
                                   check_positive)

TABLE = {"epochs": [POSITIVE_INT], "lr": [POSITIVE], "dropout": [FRACTION], "loss": [Options("mse", "mae")],
         "cycle": [Options("auto"), Interval(numbers.Integral, 0)], "patience": [POSITIVE_INT, None]}
GOOD = {"epochs": 3, "lr": 1e-3, "dropout": 0.0, "loss": "mse", "cycle": "auto", "patience": None}


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 0, "epochs must be a positive integer, got 0"),
    ("epochs", True, "epochs must be a positive integer, got True"),
    ("epochs", 2.0, "epochs must be a positive integer, got 2.0"),
    ("lr", float("inf"), "lr must be a finite number > 0, got inf"),
    ("lr", 0, "lr must be a finite number > 0, got 0"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("dropout", float("nan"), "dropout must be in"),
    ("loss", "l2", "loss must be one of mse, mae, got 'l2'"),
    ("cycle", -1, "cycle must be 'auto' or an integer >= 0, got -1"),
    ("patience", 0, "patience must be a positive integer or None, got 0"),
])
def test_check_params_names_the_parameter_and_what_it_may_be(name, value, message):
    check_params(GOOD, TABLE)
    with pytest.raises(InputError, match=message):
        check_params(dict(GOOD, **{name: value}), TABLE)


def test_numpy_scalars_and_unlisted_parameters_pass():
    check_params(dict(GOOD, epochs=np.int64(2), lr=np.float32(0.1), cycle=np.int64(0), other=object()), TABLE)


def test_layers_raise_one_error_type_through_one_check():
    with pytest.raises(InputError, match="chunk_size must be a positive integer, got True"):
        check_positive(dim=4, chunk_size=True)
    for layer in (NeuralMemory, RAMNet):
        with pytest.raises(InputError, match="heads must be a positive integer, got True"):
            layer(16, heads=True)
        with pytest.raises(InputError, match="not divisible by heads"):
            layer(10, heads=3)
