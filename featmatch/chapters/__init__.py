"""The book-facing layer: one module per chapter, the claims engine, plots, setup, runner.

Only this layer imports from every other stage. The notebooks in ``notebooks/`` call it;
they hold parameters, calls, plots and prose only.
"""
