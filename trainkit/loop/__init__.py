"""The training loop floor: the epochs, the callbacks that watch them, and the device they run on.
`engine.fit` runs the epochs and returns a `History`, calling every `Callback` with one `TrainState`;
`callbacks.py` holds the stop rules, clipping, EMA, signals and TensorBoard; `devices.py` picks the
device, precision, memory format and compiling; `optim.py` the optimizers and schedules;
`distributed.py` joins a torchrun group. It imports the data and models floors and the root, never a
run folder, a report or a command.
"""
