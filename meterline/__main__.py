from meterline.entry import main

main()
