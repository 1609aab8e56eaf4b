"""Run every benchmark and print their figures: `.venv/bin/python -m bench` (or `make bench`)."""

from bench import backup_bench, chaos, dagster_bench, fleet_bench, format_bench, repo_bench, restore_bench, sim_rps

if __name__ == "__main__":
    sim_rps.main()
    print()
    repo_bench.main([])
    print()
    backup_bench.main([])
    print()
    dagster_bench.main([])
    print()
    fleet_bench.main([])
    print()
    restore_bench.main([])
    print()
    format_bench.main([])
    print()
    chaos.main([])
