"""Every method's inference function is traced once per network: the evaluation passes
(validation every --eval_every epochs, the test split, the replay accuracy) call it
with batches of several sizes, and each new size used to cost a trace
(dgm_tf.methods.base.images_function)."""

import numpy as np
import pytest

from dgm_tf import engine
from dgm_tf.config import Config
from dgm_tf.engine.evaluation import evaluate, replay_accuracy
from dgm_tf.methods import make_method
from tests.test_baselines import tiny_config
from tests.test_dynamos import TINY as DYNAMOS_TINY
from tests.test_nispa import TINY as NISPA_TINY

# The attribute holding each method's inference function.
CASES = {
    "dgmw": (lambda: tiny_config("dgmw"), "_classify"),
    "finetune": (lambda: tiny_config("finetune"), "_classify"),
    "dynamos": (lambda: Config(**DYNAMOS_TINY), "_classify"),
    "nispa": (lambda: Config(**NISPA_TINY), "_logits_fn"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_traces_once_for_every_batch_size(name):
    make_config, attribute = CASES[name]
    config = make_config()
    scenario = engine.build_scenario(config)
    method = make_method(config, scenario)
    task = scenario.tasks[0]
    method.begin_task(task)
    sizes = {len(task.x_val), len(task.x_test), 3, 7}
    assert len(sizes) >= 3  # several batch sizes reach the function
    val, _ = evaluate(method, scenario.tasks[:1], "val")
    test, _ = evaluate(method, scenario.tasks[:1], "test")
    assert all(0.0 <= a <= 1.0 for a in val + test)
    few = method.classifier_logits(task.x_test[:3])
    more = method.classifier_logits(task.x_test[:7])
    replay_accuracy(method, scenario, 0, per_class=5, seed=1)
    assert getattr(method, attribute).experimental_get_tracing_count() == 1
    # The relaxed batch dimension computes the same logits.
    np.testing.assert_allclose(few, more[:3], rtol=1e-5, atol=1e-5)
    assert few.shape == (3, len(task.labels))
