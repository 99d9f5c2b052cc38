"""alexnet_lab's Optuna sweeper where Hydra looks for sweepers: the ``hydra_plugins`` namespace.

Hydra 1.3 instantiates a sweeper only from a class it found in ``hydra_plugins.*``, and it imports
every module there on every start, so this one stays light: the work is in alexnet_lab/search.py,
imported when a search runs (Optuna takes seconds to import). Without the search extra
(``pip install -e ".[search]"``) it defines nothing and warns about nothing.
"""

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # hydra-optuna-sweeper is not installed
    pass
else:

    class ResumableOptunaSweeper(OptunaSweeper):
        """Hydra's Optuna sweeper, continuing the study persisted in the sweep dir: see alexnet_lab/search.py."""

        def sweep(self, arguments: list[str]) -> None:
            from alexnet_lab.search import sweep

            sweep(self.sweeper, arguments)
