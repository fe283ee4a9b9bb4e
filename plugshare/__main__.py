from plugshare.cli import main

main()
