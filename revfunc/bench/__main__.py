from revfunc.bench.cli import main

main()
