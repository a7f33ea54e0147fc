from demos.build.cli import main

main()
