"""Real English text for the throughput benchmarks' prompts (written for slotmesh, no
outside source). `bench peers` cuts its prompts from this corpus at distinct offsets, so
every request starts with different tokens and no prefix cache can serve one from
another. Changing the text changes every prompt: keep it fixed, add to the end if more
prompts are ever needed.
"""

CORPUS = """\
The river that runs through the old market town rises in a bog high on the moor, where \
the peat holds the rain like a sponge and lets it go a little at a time. In a dry summer \
the stream at the top is no wider than a boot, yet by the time it reaches the mill it \
turns a wheel that once ground grain for three parishes. The miller's account books, \
kept in a careful hand for almost a century, record each flood and each drought, the \
price of wheat in every season, and the names of the carters who came down from the \
farms with their sacks.

A good kitchen knife is a simple tool that rewards attention. The steel must be hard \
enough to hold an edge but not so hard that it chips when it meets a bone. Most cooks \
sharpen too rarely and hone too little; a few strokes on a ceramic rod before each use \
keep the edge aligned, and a whetstone once a month restores what the rod cannot. The \
angle matters more than the stone. Hold it steady, count the strokes on each side, and \
finish with light passes that remove the burr.

When the first railway reached the valley, the farmers feared that the noise would sour \
the milk and frighten the sheep into the river. Within a decade they were sending their \
milk to the city every morning on the early train, and the price they were paid had \
doubled. The station master kept a garden on the platform, and in spring the travellers \
leaned out of the carriage windows to look at his tulips while the porters loaded the \
churns.

Bees do not sleep in the way that people do, but they rest. A forager that has worked \
through a long afternoon will stand still on the comb with her antennae drooping, and \
the younger bees walk around her without disturbing her. Researchers who kept bees awake \
at night found that the tired foragers performed their dances less precisely the next \
day, pointing their sisters toward flowers at slightly the wrong angle, so that the whole \
colony gathered a little less nectar.

The committee met on the first Tuesday of every month in a room above the library. Its \
minutes show that it argued for two years about whether to buy a second copying machine, \
and in the end bought a better one instead. The treasurer, who had been a schoolteacher, \
read the accounts aloud at every meeting, and no one ever found a mistake in them, \
though several members tried.

To bake bread at home you need flour, water, salt and time. Yeast will do the rest if \
you let it. Mix the dough until it holds together, leave it covered for an hour, then \
fold it over itself a few times and leave it again. A long, cool rise in the larder gives \
a better flavour than a short, warm one by the stove. Shape the loaf gently so as not to \
knock out the gas, bake it hot, and let it cool before you cut it, however hard that is.

Maps are arguments about what matters. A map made for sailors shows the depth of the \
water near the coast and the shape of every headland, but hardly anything inland; a map \
made for walkers shows every stile and footpath and leaves the sea blank. The first \
surveyors of the mountains measured the heights of the peaks by carrying heavy brass \
instruments to the summits and waiting, sometimes for days, for the cloud to lift.

The lighthouse keeper's log for the winter of the great storm is short. For four days \
the entries say only that the lamp was lit at dusk and put out at dawn, and that the wind \
was from the north-west, force ten. On the fifth day he wrote that a ship had gone onto \
the rocks below the point, that he had seen her lights go out one by one, and that the \
lifeboat had brought eleven men ashore. Then the entries return to the lamp and the wind.

A spreadsheet is a poor database and an excellent calculator. Problems begin when a \
sheet that started as a quick sum grows into the only record of a business: columns are \
added by different people for different reasons, formulas refer to cells that were later \
moved, and nobody remembers which copy is the real one. The cure is not a better \
spreadsheet but a decision about where the truth lives and who is allowed to change it.

The orchard behind the school was planted by the pupils of one year as a project, and \
the pupils of every year since have picked its apples. There are eleven varieties, some \
of them so old that they are found in no nursery catalogue, and each tree has a small \
wooden label with its name and the year it was planted. In October the children press \
the fallen fruit into juice, which they sell at the gate to pay for new trees.

Learning a second language as an adult is mostly a matter of listening. Grammar tables \
help later, once the ear has caught enough of the patterns to know what the tables are \
describing. The learners who make the fastest progress are rarely the most gifted; they \
are the ones who are willing to sound foolish, who ask the baker to repeat herself, and \
who listen to the same radio programme every morning until the words separate into \
sense.

The glacier has retreated almost two kilometres since the hut was built at its edge. \
Photographs taken from the same rock every ten years show the ice thinning and pulling \
back into its valley, leaving behind a field of grey rubble where nothing grew at first. \
Now there are mosses on the oldest stones, then grasses, then small willows no higher \
than a hand, and each decade the green line creeps a little further up the slope.

Good instructions are written by people who have watched someone else follow them. The \
author of a manual knows too much: steps that seem obvious are left out, and words that \
mean one thing to an engineer mean another to a customer. The best test is to hand the \
draft to a stranger, sit on your hands, and say nothing while they try to assemble the \
shelf. Every place where they hesitate is a sentence that needs to be rewritten.

In the harbour the fishing boats come in on the tide, and the gulls come with them. The \
catch is landed in crates of ice and sold within the hour in a shed on the quay, where \
the buyers from the restaurants stand in a row and bid with small movements of their \
hands. By noon the shed has been hosed down, the boats are tied up two and three deep \
along the wall, and the crews are asleep.
"""
