"""Guards on the gradient path's contract with Keras, and the kernel report."""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

from dist_rnn.config import ModelConfig, OptimizerConfig
from dist_rnn.errors import UserError
from dist_rnn.training.gradients import clip_by_global_norm, global_norm
from dist_rnn.models.model import check_cudnn_requirement, kernel_report
from dist_rnn.training.optimizers import build_optimizer


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_optimizers_apply_given_gradients_without_resumming_or_clipping(name):
    # Under a 2-replica MirroredStrategy Keras would sum the (already reduced)
    # gradient again; dist-rnn turns that hook into the identity. If a Keras
    # upgrade renames the hook, build_optimizer raises instead of silently
    # doubling gradients. What the patch does to a real update under two
    # replicas is tested in test_fast_mirrored.py.
    assert hasattr(keras.optimizers.Optimizer, "_all_reduce_sum_gradients")
    optimizer = build_optimizer(OptimizerConfig(name=name))
    assert optimizer.clipnorm is None and optimizer.global_clipnorm is None


def test_global_norm_clip_scales_only_above_bound():
    grads = [tf.constant([3.0, 0.0]), tf.constant([[4.0]])]
    norm = global_norm(grads)
    assert float(norm) == pytest.approx(5.0)
    clipped = clip_by_global_norm(grads, 1.0, norm)
    assert float(global_norm(clipped)) == pytest.approx(1.0)
    assert clipped[0].numpy().tolist() == pytest.approx([0.6, 0.0])
    unclipped = clip_by_global_norm(grads, 10.0, norm)
    assert unclipped[0].numpy().tolist() == [3.0, 0.0]
    assert clip_by_global_norm(grads, 0.0, norm) is grads


def test_kernel_report_names_each_layer_and_reason():
    lines = [k.line() for k in kernel_report(ModelConfig(cell="lstm", num_layers=2, hidden_size=256), False)]
    assert lines == ["layer 0  lstm  256 units  kernel: dist-rnn fused recurrence (no GPU visible)",
                     "layer 1  lstm  256 units  kernel: dist-rnn fused recurrence (no GPU visible)"]
    on_gpu = kernel_report(ModelConfig(cell="gru", num_layers=1), True)
    assert on_gpu[0].fused and on_gpu[0].line().endswith("kernel: cuDNN fused")
    dropout = kernel_report(ModelConfig(cell="lstm", recurrent_dropout=0.1), True)[0]
    assert dropout.line().endswith("kernel: dist-rnn fused recurrence (recurrent dropout: cuDNN has none)")
    assert kernel_report(ModelConfig(cell="lstm", cudnn="off"), True)[0].reason == "model.cudnn: off"
    ln = kernel_report(ModelConfig(cell="ln_lstm", recurrent_dropout=0.1), True)[0]
    assert ln.line().endswith("kernel: dist-rnn fused recurrence (custom cell)")


def test_cudnn_require_fails_on_cpu_naming_each_layer():
    config = ModelConfig(cell="lstm", num_layers=2, cudnn="require")
    with pytest.raises(UserError) as err:
        check_cudnn_requirement(config, kernel_report(config, gpu_visible=False))
    message = str(err.value)
    assert "layer 0 (lstm): no GPU visible" in message and "layer 1 (lstm): no GPU visible" in message
    ok = ModelConfig(cell="lstm", num_layers=2, cudnn="require")
    check_cudnn_requirement(ok, kernel_report(ok, gpu_visible=True))  # no error when every layer is fused


@pytest.mark.gpu
@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="needs a GPU: the fused kernel exists only there")
def test_lstm_and_gru_layers_run_the_fused_kernel_on_gpu():
    from dist_rnn.models.model import build_model

    for cell in ("lstm", "gru"):
        config = ModelConfig(cell=cell, num_layers=2, hidden_size=32, embedding_size=16, cudnn="require")
        model = build_model(config, 50, seed=0)
        for layer in model.recurrent_layers:
            assert layer.use_cudnn in ("auto", True)
            # use_cudnn=True raises when the fused kernel cannot run.
            layer.use_cudnn = True
        model(tf.zeros([2, 5], tf.int32))
