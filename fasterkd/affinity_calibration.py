"""Measured seconds per image of the exact FA paths: the table behind ``impl="auto"``.

Written by ``benchmarks/fa_loss.py --calibrate`` (never by hand); see benchmarks/README.md.
``TIMINGS[device type][q]`` lists measured shapes as (pixels N, channels C_t + C_s,
{candidate: fastest forward + backward seconds per image}); a candidate is ``"reference"``,
``"gram"``, ``"triton"`` or ``"tiled:<tile>"``.
"""

MACHINES = {'cpu': {'cpu_model': 'AMD EPYC', 'cpu_flags': ['avx2', 'fma', 'avx512f', 'avx512_bf16'], 'cpu_count': 2, 'cpus_usable': 2, 'torch_threads': 1, 'load_average': [4.3330078125, 3.0107421875, 1.5771484375], 'torch': '2.13.0+cpu', 'python': '3.11.7', 'device': 'cpu', 'gpu': None, 'mm_fp32_gflops': 45.563742798340236, 'mm_shape': [2048, 2048, 2048]}}
COMMANDS = {'cpu': 'python benchmarks/fa_loss.py --device cpu --threads 1 --calibrate --repeats 3'}
TIMINGS = {
    'cpu': {
        1: [
            (256, 64, {'reference': 0.000418, 'tiled:256': 0.000689}),
            (256, 256, {'reference': 0.000911, 'tiled:256': 0.001034}),
            (1024, 64, {'reference': 0.012865, 'tiled:256': 0.00439, 'tiled:512': 0.00417, 'tiled:1024': 0.006374}),
            (1024, 256, {'reference': 0.028433, 'tiled:256': 0.014232, 'tiled:512': 0.018267, 'tiled:1024': 0.018052}),
            (2048, 64, {'reference': 0.06498, 'tiled:256': 0.018837, 'tiled:512': 0.020432, 'tiled:1024': 0.0176}),
            (2048, 256, {'reference': 0.104002, 'tiled:256': 0.036466, 'tiled:512': 0.033146, 'tiled:1024': 0.035151}),
            (4096, 64, {'reference': 0.331398, 'tiled:256': 0.044845, 'tiled:512': 0.043884, 'tiled:1024': 0.047077}),
            (4096, 256, {'reference': 0.828211, 'tiled:256': 0.258379, 'tiled:512': 0.217649, 'tiled:1024': 0.262893}),
            (8192, 64, {'tiled:256': 0.369138, 'tiled:512': 0.35829, 'tiled:1024': 0.370599}),
            (8192, 256, {'tiled:256': 0.691569, 'tiled:512': 0.669005, 'tiled:1024': 0.681818}),
        ],
        2: [
            (256, 64, {'reference': 0.000339, 'tiled:256': 0.000448, 'gram': 0.000209}),
            (256, 256, {'reference': 0.000856, 'tiled:256': 0.001221, 'gram': 0.00075}),
            (1024, 64, {'reference': 0.005062, 'tiled:256': 0.007671, 'tiled:512': 0.003548, 'tiled:1024': 0.00849, 'gram': 0.000582}),
            (1024, 256, {'reference': 0.020056, 'tiled:256': 0.018712, 'tiled:512': 0.016237, 'tiled:1024': 0.027566, 'gram': 0.003085}),
            (2048, 64, {'reference': 0.132937, 'tiled:256': 0.021619, 'tiled:512': 0.023459, 'tiled:1024': 0.024695, 'gram': 0.000964}),
            (2048, 256, {'reference': 0.2061, 'tiled:256': 0.077928, 'tiled:512': 0.046432, 'tiled:1024': 0.046791, 'gram': 0.015944}),
            (4096, 64, {'reference': 0.934415, 'tiled:256': 0.074511, 'tiled:512': 0.056412, 'tiled:1024': 0.083979, 'gram': 0.00159}),
            (4096, 256, {'reference': 0.988902, 'tiled:256': 0.321543, 'tiled:512': 0.319263, 'tiled:1024': 0.340415, 'gram': 0.024063}),
            (8192, 64, {'tiled:256': 0.414932, 'tiled:512': 0.364617, 'tiled:1024': 0.384249, 'gram': 0.002435}),
            (8192, 256, {'tiled:256': 0.829981, 'tiled:512': 1.403127, 'tiled:1024': 1.464466, 'gram': 0.025316}),
        ],
    },
}
