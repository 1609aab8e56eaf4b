"""Run every benchmark and print their figures: `.venv/bin/python -m bench` (or `make bench`)."""

from bench import (backup_bench, chaos, cpu_bench, fidelity_bench, fleet_bench, format_bench, orchestration_bench,
                   repo_bench, restore_bench, sim_rps)

if __name__ == "__main__":
    sim_rps.main()
    print()
    repo_bench.main([])
    print()
    backup_bench.main([])
    print()
    cpu_bench.main(["--only", "1"])  # its part 2 is backup_bench's part 2a, run just above
    print()
    orchestration_bench.main([])
    print()
    fleet_bench.main([])
    print()
    restore_bench.main([])
    print()
    format_bench.main([])
    print()
    chaos.main([])
    print()
    fidelity_bench.main([])
