"""Measured seconds per image of the exact FA paths: the table behind ``impl="auto"``.

Written by ``benchmarks/fa_loss.py --calibrate`` (never by hand); see benchmarks/README.md.
``TIMINGS[device type][q]`` lists measured shapes as (pixels N, channels C_t + C_s,
{candidate: fastest forward + backward seconds per image}); a candidate is ``"reference"``,
``"gram"``, ``"triton"`` or ``"tiled:<tile>"``.
"""

MACHINES = {'cpu': {'cpu_model': 'AMD EPYC', 'cpu_flags': ['avx2', 'fma', 'avx512f', 'avx512_bf16'], 'cpu_count': 2, 'cpus_usable': 2, 'torch_threads': 1, 'load_average': [0.80810546875, 0.8623046875, 1.111328125], 'torch': '2.13.0+cpu', 'python': '3.11.7', 'device': 'cpu', 'gpu': None, 'mm_fp32_gflops': 97.72886115587899, 'mm_shape': [2048, 2048, 2048]}}
COMMANDS = {'cpu': 'python benchmarks/fa_loss.py --device cpu --threads 1 --calibrate --repeats 3'}
TIMINGS = {
    'cpu': {
        1: [
            (256, 64, {'reference': 0.000529, 'tiled:256': 0.000596}),
            (256, 256, {'reference': 0.00102, 'tiled:256': 0.001091}),
            (1024, 64, {'reference': 0.012042, 'tiled:256': 0.004439, 'tiled:512': 0.003381, 'tiled:768': 0.003611, 'tiled:1024': 0.003815}),
            (1024, 256, {'reference': 0.018142, 'tiled:256': 0.009451, 'tiled:512': 0.009075, 'tiled:768': 0.009599, 'tiled:1024': 0.010419}),
            (2048, 64, {'reference': 0.048324, 'tiled:256': 0.011612, 'tiled:512': 0.010578, 'tiled:768': 0.010488, 'tiled:1024': 0.012584}),
            (2048, 256, {'reference': 0.097311, 'tiled:256': 0.035876, 'tiled:512': 0.031298, 'tiled:768': 0.031905, 'tiled:1024': 0.034824}),
            (4096, 64, {'reference': 0.31357, 'tiled:256': 0.041476, 'tiled:512': 0.037894, 'tiled:768': 0.035066, 'tiled:1024': 0.038127}),
            (4096, 256, {'reference': 0.443894, 'tiled:256': 0.117357, 'tiled:512': 0.110814, 'tiled:768': 0.108142, 'tiled:1024': 0.114359}),
            (8192, 64, {'tiled:256': 0.160338, 'tiled:512': 0.143582, 'tiled:768': 0.129106, 'tiled:1024': 0.141907}),
            (8192, 256, {'tiled:256': 0.460306, 'tiled:512': 0.423937, 'tiled:768': 0.412045, 'tiled:1024': 0.428894}),
        ],
        2: [
            (256, 64, {'reference': 0.000439, 'tiled:256': 0.000599, 'gram': 0.000293}),
            (256, 256, {'reference': 0.000952, 'tiled:256': 0.001406, 'gram': 0.000838}),
            (1024, 64, {'reference': 0.005334, 'tiled:256': 0.004016, 'tiled:512': 0.003925, 'tiled:768': 0.004072, 'tiled:1024': 0.004618, 'gram': 0.000598}),
            (1024, 256, {'reference': 0.013768, 'tiled:256': 0.012833, 'tiled:512': 0.013033, 'tiled:768': 0.013856, 'tiled:1024': 0.015776, 'gram': 0.003084}),
            (2048, 64, {'reference': 0.05323, 'tiled:256': 0.013096, 'tiled:512': 0.012986, 'tiled:768': 0.012975, 'tiled:1024': 0.013947, 'gram': 0.000937}),
            (2048, 256, {'reference': 0.085884, 'tiled:256': 0.043814, 'tiled:512': 0.043683, 'tiled:768': 0.044487, 'tiled:1024': 0.048064, 'gram': 0.005749}),
            (4096, 64, {'reference': 0.343937, 'tiled:256': 0.046852, 'tiled:512': 0.045815, 'tiled:768': 0.043631, 'tiled:1024': 0.047893, 'gram': 0.001544}),
            (4096, 256, {'reference': 0.469489, 'tiled:256': 0.163648, 'tiled:512': 0.158767, 'tiled:768': 0.158292, 'tiled:1024': 0.168353, 'gram': 0.01123}),
            (8192, 64, {'tiled:256': 0.182231, 'tiled:512': 0.176715, 'tiled:768': 0.164181, 'tiled:1024': 0.176706, 'gram': 0.002516}),
            (8192, 256, {'tiled:256': 0.636149, 'tiled:512': 0.598954, 'tiled:768': 0.586948, 'tiled:1024': 0.608209, 'gram': 0.022998}),
        ],
    },
}
