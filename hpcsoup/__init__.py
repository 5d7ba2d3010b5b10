"""hpcsoup: combine trained Graph Neural Networks at HPC scale.

The pipeline, one subpackage per stage::

    data  ->  models  ->  train  ->  store  ->  soup / merge  ->  bench

``hpcsoup.cli`` is a thin command line over the Python API of these stages.
"""

__version__ = "0.1.0"
