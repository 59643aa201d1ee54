"""The Keras rows: a minimal hand-written loop (``floor``: around the dist-rnn model; ``keras``: around
stock Keras layers) and Keras ``model.fit`` (``fit``)."""

from __future__ import annotations

import time
from pathlib import Path

from dist_rnn.config import TWO_STATE_CELLS

from bench.protocol import peak_rss_mib, serve
from bench.tf_support import tf_memory, tf_setup
from bench.workload import window_timer, windows


def keras_layers(spec: dict, keras, return_state: bool = True):
    """The recurrent layers of a row: stock Keras LSTM/GRU, or the dist-rnn layer for cells Keras lacks."""
    from dist_rnn.models.layers import RECURRENT_LAYERS

    layers = []
    for _ in range(spec["layers"]):
        kwargs = dict(return_sequences=True, return_state=return_state)
        if spec["cell"] == "lstm":
            layers.append(keras.layers.LSTM(spec["hidden"], **kwargs))
        elif spec["cell"] == "gru":
            layers.append(keras.layers.GRU(spec["hidden"], reset_after=True, **kwargs))
        else:  # no stock Keras layer: the dist-rnn layer
            layers.append(RECURRENT_LAYERS[spec["cell"]](spec["hidden"], **kwargs))
    return layers


def _dist_rnn_model_forward(spec: dict):
    """``(forward, variables, kernel)`` of the dist-rnn LanguageModel (``floor``)."""
    from dist_rnn.config import ModelConfig
    from dist_rnn.models.model import build_model, cudnn_excluded_by

    model = build_model(ModelConfig(cell=spec["cell"], num_layers=spec["layers"], hidden_size=spec["hidden"],
                                    embedding_size=spec["embedding"]), spec["vocab"], 0,
                        allow_cudnn=not cudnn_excluded_by(spec["jit"], spec["precision"]))

    def forward(x, states):
        return model(x, states, training=True)

    return forward, model.trainable_variables, "dist-rnn model"


def _keras_layers_forward(spec: dict, tf, keras, n_states: int):
    """``(forward, variables, kernel)`` of Embedding, the stock recurrent layers and Dense (``keras``)."""
    embedding = keras.layers.Embedding(spec["vocab"], spec["embedding"])
    rnns = keras_layers(spec, keras)
    dense = keras.layers.Dense(spec["vocab"], dtype="float32")

    def forward(x, states):
        h = embedding(x)
        new_states = []
        for i, layer in enumerate(rnns):
            h, *s = layer(h, initial_state=list(states[i * n_states:(i + 1) * n_states]), training=True)
            new_states += s
        return dense(h), tuple(tf.cast(s, tf.float32) for s in new_states)

    forward(tf.zeros([spec["batch"], spec["bptt"]], tf.int32),
            tuple(tf.zeros([spec["batch"], spec["hidden"]]) for _ in range(n_states * spec["layers"])))
    variables = embedding.trainable_variables + [v for r in rnns for v in r.trainable_variables] + \
        dense.trainable_variables
    return forward, variables, type(rnns[0]).__module__ + "." + type(rnns[0]).__name__


def _minimal_train_step(spec: dict, tf, keras, forward, variables):
    """A ``tf.function`` step: tape, (scaled) loss, global-norm clip, ``optimizer.apply``; state in and out."""
    optimizer = keras.optimizers.Adam(0.002)
    scaled = spec["precision"] == "mixed_float16"
    if scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)

    @tf.function
    def train_step(x, y, states):
        with tf.GradientTape() as tape:
            logits, new_states = forward(x, states)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            objective = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(objective, variables)
        if spec["clip"]:
            grads, _ = tf.clip_by_global_norm(grads, spec["clip"])
        optimizer.apply(grads, variables)
        return loss, new_states

    return train_step


def work_minimal(spec: dict, workdir: Path) -> None:
    """A minimal hand-written Keras 3 training loop with carried state.

    ``floor``: around the dist-rnn LanguageModel (identical math to the
    dist-rnn rows). ``keras``: around stock Keras layers.
    """
    base_rss = peak_rss_mib()
    tf = tf_setup(spec)
    import keras

    keras.mixed_precision.set_global_policy(spec["precision"])
    keras.utils.set_random_seed(0)
    n_states = 2 if spec["cell"] in TWO_STATE_CELLS else 1
    if spec["system"] == "floor":
        forward, variables, kernel = _dist_rnn_model_forward(spec)
    else:
        forward, variables, kernel = _keras_layers_forward(spec, tf, keras, n_states)
    train_step = _minimal_train_step(spec, tf, keras, forward, variables)

    fixed = [(tf.constant(x), tf.constant(y)) for x, y in windows(spec)]
    zero = tuple(tf.zeros([spec["batch"], spec["hidden"]]) for _ in range(n_states * spec["layers"]))
    run = window_timer(fixed, zero, train_step)

    info = {"vocab": spec["vocab"], "layer": kernel, "parameters": int(sum(int(tf.size(v)) for v in variables))}
    serve(spec, run, lambda: tf_memory(base_rss), info)


def work_fit(spec: dict, workdir: Path) -> None:
    """Keras ``model.fit`` on stock layers (stateless: zero state every batch), default compile settings."""
    base_rss = peak_rss_mib()
    tf = tf_setup(spec)
    import keras

    keras.mixed_precision.set_global_policy(spec["precision"])
    keras.utils.set_random_seed(0)
    layers = [keras.Input((spec["bptt"],), batch_size=spec["batch"], dtype="int32"),
              keras.layers.Embedding(spec["vocab"], spec["embedding"])]
    layers += keras_layers(spec, keras, return_state=False)
    layers.append(keras.layers.Dense(spec["vocab"], dtype="float32"))
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.Adam(0.002, global_clipnorm=spec["clip"] or None)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xs, ys = zip(*windows(spec))
    dataset = tf.data.Dataset.from_tensor_slices((list(xs), list(ys))).repeat().prefetch(2)

    class Timer(keras.callbacks.Callback):
        def __init__(self, n):
            super().__init__()
            self.n, self.times = n, {}

        def on_train_batch_end(self, batch, logs=None):
            if batch in (0, self.n):
                self.times[batch] = time.perf_counter()

    def run(n: int) -> float:
        timer = Timer(n)
        model.fit(dataset, epochs=1, steps_per_epoch=n + 1, verbose=0, callbacks=[timer])
        return timer.times[n] - timer.times[0]

    info = {"vocab": spec["vocab"], "jit_compile": bool(getattr(model, "jit_compile", False)),
            "parameters": int(model.count_params())}
    serve(spec, run, lambda: tf_memory(base_rss), info)
