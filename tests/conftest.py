def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a SLURM cluster (slurm/local/start brings up a local one)")
