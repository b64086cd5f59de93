from chronicle.cli import main

main()
