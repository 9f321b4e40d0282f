"""`fastdecode bench`: workloads, the interleaved runner, metrics, peer tools, reports and plots.

Import direction: cli -> runner / peers / report / plots -> metrics -> runner's row format; nothing in the
engine, the model or the drafters imports this package.
"""
