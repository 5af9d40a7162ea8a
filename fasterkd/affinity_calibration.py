"""Measured seconds per image of the exact FA paths: the table behind ``impl="auto"``.

Written by ``benchmarks/fa_loss.py --calibrate`` (never by hand); see benchmarks/README.md.
``TIMINGS[device type][q]`` lists measured shapes as (pixels N, channels C_t + C_s,
{candidate: fastest forward + backward seconds per image}); a candidate is ``"reference"``,
``"gram"``, ``"triton"`` or ``"tiled:<tile>"``.
"""

MACHINES = {'cpu': {'cpu_model': 'AMD EPYC', 'cpu_flags': ['avx2', 'fma', 'avx512f', 'avx512_bf16'], 'cpu_count': 2, 'cpus_usable': 2, 'torch_threads': 1, 'load_average': [7.52392578125, 7.21923828125, 6.51904296875], 'torch': '2.13.0+cpu', 'python': '3.11.7', 'device': 'cpu', 'gpu': None, 'mm_fp32_gflops': 22.700528803851817, 'mm_shape': [2048, 2048, 2048]}}
COMMANDS = {'cpu': 'python benchmarks/fa_loss.py --device cpu --threads 1 --calibrate --repeats 3'}
TIMINGS = {
    'cpu': {
        1: [
            (256, 64, {'reference': 0.000446, 'tiled:256': 0.000692}),
            (256, 256, {'reference': 0.00129, 'tiled:256': 0.00139}),
            (1024, 64, {'reference': 0.02493, 'tiled:256': 0.010844, 'tiled:512': 0.01414, 'tiled:1024': 0.017473}),
            (1024, 256, {'reference': 0.052082, 'tiled:256': 0.025885, 'tiled:512': 0.025252, 'tiled:1024': 0.036844}),
            (2048, 64, {'reference': 0.130337, 'tiled:256': 0.031208, 'tiled:512': 0.025946, 'tiled:1024': 0.039869}),
            (2048, 256, {'reference': 0.21971, 'tiled:256': 0.09561, 'tiled:512': 0.083836, 'tiled:1024': 0.094878}),
            (4096, 64, {'reference': 0.77315, 'tiled:256': 0.11196, 'tiled:512': 0.099048, 'tiled:1024': 0.100541}),
            (4096, 256, {'reference': 0.895314, 'tiled:256': 0.252675, 'tiled:512': 0.271939, 'tiled:1024': 0.284809}),
            (8192, 64, {'tiled:256': 0.351207, 'tiled:512': 0.32942, 'tiled:1024': 0.371578}),
            (8192, 256, {'tiled:256': 1.061111, 'tiled:512': 1.011478, 'tiled:1024': 0.991525}),
        ],
        2: [
            (256, 64, {'reference': 0.000418, 'tiled:256': 0.000625, 'gram': 0.000354}),
            (256, 256, {'reference': 0.000998, 'tiled:256': 0.001847, 'gram': 0.000948}),
            (1024, 64, {'reference': 0.012902, 'tiled:256': 0.004306, 'tiled:512': 0.008263, 'tiled:1024': 0.009332, 'gram': 0.00072}),
            (1024, 256, {'reference': 0.030909, 'tiled:256': 0.0276, 'tiled:512': 0.029064, 'tiled:1024': 0.033135, 'gram': 0.004127}),
            (2048, 64, {'reference': 0.105235, 'tiled:256': 0.021958, 'tiled:512': 0.022312, 'tiled:1024': 0.030145, 'gram': 0.001155}),
            (2048, 256, {'reference': 0.191494, 'tiled:256': 0.11127, 'tiled:512': 0.099062, 'tiled:1024': 0.110791, 'gram': 0.015119}),
            (4096, 64, {'reference': 0.780929, 'tiled:256': 0.062946, 'tiled:512': 0.091874, 'tiled:1024': 0.071246, 'gram': 0.001717}),
            (4096, 256, {'reference': 0.863603, 'tiled:256': 0.323103, 'tiled:512': 0.361255, 'tiled:1024': 0.385537, 'gram': 0.027015}),
            (8192, 64, {'tiled:256': 0.363525, 'tiled:512': 0.341138, 'tiled:1024': 0.3813, 'gram': 0.00256}),
            (8192, 256, {'tiled:256': 1.394512, 'tiled:512': 1.387101, 'tiled:1024': 1.391968, 'gram': 0.035013}),
        ],
    },
}
