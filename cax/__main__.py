from cax.cli import main

main()
